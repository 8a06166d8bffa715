"""CPU timing of the step-by-step reference vs the PyTorch chunkwise delta rule (forward).

    python benchmarks/bench_cpu.py [--T 512 1024 2048 4096] [--H 4] [--D 64] [--repeats 5]

Prints a markdown table (best of ``--repeats`` wall-clock runs, float32, batch 1, no grad).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from deltanet.ops import delta_rule_chunkwise_torch, delta_rule_reference


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--D", type=int, default=64, help="head dim (K = V)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    print(f"# CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, float32, B=1, H={args.H}, K=V={args.D}, chunk {args.chunk_size}\n")
    print("| T | reference (ms) | chunkwise (ms) | speed-up |")
    print("|---|---|---|---|")
    for T in args.T:
        g = torch.Generator().manual_seed(T)
        q = torch.randn(1, T, args.H, args.D, generator=g)
        k = F.normalize(torch.randn(1, T, args.H, args.D, generator=g), dim=-1)
        v = torch.randn(1, T, args.H, args.D, generator=g)
        beta = torch.rand(1, T, args.H, generator=g)
        with torch.no_grad():
            t_ref = best_time(lambda: delta_rule_reference(q, k, v, beta), args.repeats)
            t_chunk = best_time(lambda: delta_rule_chunkwise_torch(q, k, v, beta, chunk_size=args.chunk_size),
                                args.repeats)
        print(f"| {T} | {t_ref * 1e3:.1f} | {t_chunk * 1e3:.2f} | {t_ref / t_chunk:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
