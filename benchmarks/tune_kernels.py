"""Per-kernel profile and launch-setting sweep for the chunk kernels (GPU). Prints, for a few
(D, T) at 32K tokens x 16 heads in bf16: each kernel's time in one fwd+bwd, then fwd and
fwd+bwd medians for each variant of ``chunk.TUNING``. Used to pick the defaults in
``chunk._configs``; results in benchmarks/NOTES-kernels.md.

    python benchmarks/tune_kernels.py --dims 64,128 --lengths 1024,16384
"""

from __future__ import annotations

import argparse
import importlib
import json

import torch
from triton.testing import do_bench

from deltanet.bench.kernels import _inputs

chunk = importlib.import_module("deltanet.ops.delta_rule.chunk")

VARIANTS = {
    "base": {},
    "dvl0": {"DV_LOCAL": 0},
    "bvs16": {"BV_STATE": 16},
    "bvs32": {"BV_STATE": 32},
    "bvs64": {"BV_STATE": 64},
    "ws8": {"WARPS_STATE": 8},
    "ss1": {"STAGES_STATE": 1},
    "ss3": {"STAGES_STATE": 3},
    "bvo128": {"BV_O": 128, "WARPS_O": 8},
    "wo8": {"WARPS_O": 8},
    "so3": {"STAGES_O": 3},
    "dqkw128": {"BK_DQKW": 128, "WARPS_DQKW": 8},
    "wdqkw8": {"WARPS_DQKW": 8},
    "sdqkw3": {"STAGES_DQKW": 3},
    "wwy8": {"WARPS_WY": 8},
    # From the offline spill report (benchmarks/kernel_resources.py): at 4 warps wy_bwd and
    # dqkw spill ~2.6-2.9 KB per thread, at 8 warps ~0.6-0.8 KB; wy_fwd 640 B -> 80 B.
    "w8wy_dqkw": {"WARPS_WY": 8, "WARPS_DQKW": 8},
    "w8wy_dqkw_bk32": {"WARPS_WY": 8, "WARPS_DQKW": 8, "BK_DQKW": 32},
    "w8_regsolve": {"WARPS_WY": 8, "WARPS_DQKW": 8, "WY_BATCHED": 0},
    # wy_fwd_dense_kernel: A as one 64x64 product, the merge as four 64x64 tf32 products.
    "dense_w8": {"WY_DENSE": 1, "WARPS_WY": 8},
    "dense_w8_dqkw8": {"WY_DENSE": 1, "WARPS_WY": 8, "WARPS_DQKW": 8},
}


def profile(D, T, H=16, tokens=32768):
    q, k, v, beta = _inputs(tokens // T, T, H, D, torch.bfloat16, "cuda")
    do = torch.randn_like(v)
    step = lambda: chunk.chunk_delta_rule(q, k, v, beta)[0].backward(do)
    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            out.append((e.key[:32], round(t / 5, 1)))
    out.sort(key=lambda x: -x[1])
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="64,128")
    p.add_argument("--lengths", default="1024,16384")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    shapes = [(int(d), int(t)) for d in args.dims.split(",") for t in args.lengths.split(",")]
    for D, T in shapes:
        chunk.TUNING.clear()
        prof = profile(D, T)
        total = sum(t for _, t in prof)
        print(f"PROFILE D={D} T={T} total {total:.0f} us: " + ", ".join(f"{n}={t:.0f}" for n, t in prof[:10]), flush=True)
    rows = []
    for name in args.variants.split(","):
        for D, T in shapes:
            chunk.TUNING.clear()
            chunk.TUNING.update(VARIANTS[name])
            try:
                q, k, v, beta = _inputs(32768 // T, T, 16, D, torch.bfloat16, "cuda")
                do = torch.randn_like(v)
                f = lambda: chunk.chunk_delta_rule(q, k, v, beta)[0]
                fb = lambda: f().backward(do)
                fb()
                with torch.no_grad():
                    tf = do_bench(f, warmup=10, rep=40, return_mode="median")
                tfb = do_bench(fb, warmup=10, rep=40, grad_to_none=[q, k, v, beta], return_mode="median")
                rows.append(dict(variant=name, D=D, T=T, fwd=round(tf, 3), fwdbwd=round(tfb, 3)))
            except Exception as e:
                rows.append(dict(variant=name, D=D, T=T, error=repr(e)[:120]))
            print(json.dumps(rows[-1]), flush=True)
    chunk.TUNING.clear()
    print("| variant | " + " | ".join(f"D{D} T{T} fwd/fb ms" for D, T in shapes) + " |")
    for name in args.variants.split(","):
        cells = []
        for D, T in shapes:
            r = next(r for r in rows if r["variant"] == name and r["D"] == D and r["T"] == T)
            cells.append(f"{r['fwd']:.3f}/{r['fwdbwd']:.3f}" if "fwd" in r else "err")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
