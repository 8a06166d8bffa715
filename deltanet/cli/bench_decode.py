"""``deltanet bench decode``: flags -> :func:`deltanet.bench.decode.decode_sweep`; the help text is
that module's docstring."""

from __future__ import annotations

import argparse
import sys

from .bench_model import _csv

__all__ = ["build_parser", "cli_main"]


def build_parser() -> argparse.ArgumentParser:
    from deltanet.bench import decode as bench

    p = argparse.ArgumentParser(prog="deltanet bench decode", description=bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: _csv(str, s), default=list(bench.DECODE_MODELS),
                   help=f"comma-separated presets and/or {bench.FLA} (default: {','.join(bench.DECODE_MODELS)})")
    p.add_argument("--paths", type=lambda s: _csv(str, s), default=list(bench.PATHS),
                   help="generate (Hugging Face generate) and/or loop (our captured decode loop); default both")
    p.add_argument("--batch", type=lambda s: _csv(int, s), default=[1, 32])
    p.add_argument("--prompt", type=lambda s: _csv(int, s), default=[2048], help="prompt lengths, comma-separated")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed calls per point (best is kept)")
    p.add_argument("--cuda-graph", choices=("on", "off", "both"), default="on",
                   help="our models on the generate path: decode steps replayed from a CUDA graph, launched "
                        "eagerly, or both rows (default: on); the loop always captures on CUDA")
    p.add_argument("--decode-kernel", type=lambda s: _csv(str, s), default=None,
                   help="route(s) of the delta-rule layers' one-token steps, comma-separated: fused (one Triton "
                        "kernel per layer), eager (op by op), auto (fused on CUDA); a row per route "
                        "(default: the config's, auto)")
    p.add_argument("--hbm-gbps", type=float, default=None,
                   help="memory bandwidth for the floor, GB/s (default: measured by a device copy)")
    p.add_argument("--budget-s", type=float, default=None, help="skip the points that start after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny models, short runs, CPU if no GPU: checks the script")
    p.add_argument("--out", help="write the markdown table to this file (and JSON next to it, .json), after every row")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p


def cli_main(argv: list[str]) -> int:
    """``deltanet bench decode [options]`` (``argv`` may start with "decode")."""
    if argv and argv[0] == "decode":
        argv = argv[1:]
    import torch

    from deltanet.bench import decode as bench

    p = build_parser()
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        print("deltanet bench decode: no CUDA device; use --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    from deltanet.models import PRESETS

    for m in args.models:
        if m != bench.FLA and m not in PRESETS:
            p.error(f"unknown model {m!r}; choose presets from {sorted(PRESETS)} or {bench.FLA}")
    bad = [x for x in args.paths if x not in bench.PATHS]
    if bad or not args.paths:
        p.error(f"--paths takes generate and/or loop, got {bad or 'nothing'}")
    bad = [x for x in (args.decode_kernel or []) if x not in bench.DECODE_KERNELS]
    if bad:
        p.error(f"--decode-kernel takes {','.join(bench.DECODE_KERNELS)}, got {bad}")
    if args.smoke:
        args.batch, args.prompt, args.new_tokens = [1, 2], [16], 8
    from deltanet.bench.model import environment

    env = environment(device, " ".join(["deltanet", "bench", "decode", *argv]))
    if args.smoke:
        env["note"] = "SMOKE RUN: presets shrunk to tiny sizes, numbers meaningless"
    table, _ = bench.decode_sweep(args.models, args.paths, args.batch, args.prompt, new_tokens=args.new_tokens,
                                  device=device, cuda_graph=args.cuda_graph, smoke=args.smoke, repeats=args.repeats,
                                  hbm_gbps=args.hbm_gbps, budget_s=args.budget_s, out=args.out, env=env,
                                  decode_kernels=args.decode_kernel)
    print(table)
    return 0
