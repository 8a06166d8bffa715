"""``deltanet bench kernels``: flags -> :func:`deltanet.bench.kernels.run_sweep` (or
:func:`~deltanet.bench.kernels.run_decode_steps`); the help text is that module's docstring."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "cli_main"]


def build_parser() -> argparse.ArgumentParser:
    from deltanet.bench import kernels

    p = argparse.ArgumentParser(prog="deltanet bench kernels", description=kernels.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", default="64,128,256", help="head dims (K = V), comma-separated")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384", help="sequence lengths T")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per call (B = tokens / T)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--methods", default=",".join(kernels.METHODS), help=f"from {kernels.METHODS}")
    p.add_argument("--max-recurrent-T", type=int, default=4096, help="skip recurrent methods above this T")
    p.add_argument("--json", default=None, help="append one JSON line per measurement to this file")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--decode-batches", default=None,
                   help="instead of the sweep: time one decoding step (T = 1, state in and out) of the "
                        "recurrent methods at these batch sizes, e.g. 1,8,32,128,256")
    return p


def cli_main(argv: list[str]) -> int:
    """``deltanet bench kernels [options]`` (see ``--help``)."""
    import torch

    from deltanet.bench import kernels

    p = build_parser()
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("deltanet bench kernels: no CUDA device (it times the Triton GPU kernels); on a CPU, "
              "`python benchmarks/bench_cpu.py` in a checkout times the PyTorch chunkwise op against the "
              "reference, and `deltanet bench model --smoke` checks the model benchmark", file=sys.stderr)
        return 2
    dims = [int(x) for x in args.dims.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    for m in methods:
        if m not in kernels.METHODS:
            p.error(f"unknown method {m!r}; choose from {kernels.METHODS}")
    if args.decode_batches:
        rows = kernels.run_decode_steps(dims, [int(x) for x in args.decode_batches.split(",")], methods,
                                        heads=args.heads, warmup=args.warmup, rep=args.rep, json_path=args.json)
        print(kernels.format_decode_table(rows))
        return 0
    rows = kernels.run_sweep(dims, lengths, methods, tokens=args.tokens, heads=args.heads,
                             max_recurrent_T=args.max_recurrent_T, warmup=args.warmup, rep=args.rep,
                             json_path=args.json)
    print(kernels.format_table(rows))
    return 0
