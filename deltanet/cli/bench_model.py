"""``deltanet bench model``: flags -> :func:`deltanet.bench.model.train_sweep`; the help text is that
module's docstring (``deltanet bench decode``: :mod:`deltanet.cli.bench_decode`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser", "cli_main"]


def _csv(kind, text):
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None


def build_parser(what: str) -> argparse.ArgumentParser:
    """The parser of ``deltanet bench model``."""
    from deltanet.bench import model as bench

    p = argparse.ArgumentParser(prog=f"deltanet bench {what}", description=bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    default_models = bench.TRAIN_MODELS
    p.add_argument("--models", type=lambda s: _csv(str, s), default=list(default_models),
                   help=f"comma-separated presets and/or {bench.FLA} (default: {','.join(default_models)})")
    p.add_argument("--smoke", action="store_true", help="tiny models, short runs, CPU if no GPU: checks the script")
    p.add_argument("--out", help="write the markdown table to this file (and JSON next to it, .json)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    if what == "model":
        p.add_argument("--lengths", type=lambda s: _csv(int, s), default=[2048, 4096, 8192])
        p.add_argument("--tokens", type=int, default=32768, help="tokens per step (batch = tokens / T)")
        p.add_argument("--steps", type=int, default=10, help="timed steps")
        p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
        p.add_argument("--compile", action="store_true", help="our models: torch.compile the whole model")
        p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                       help="time the models in alternation, ROUNDS rounds of --steps steps each, all "
                            "resident in one process (throughput only; compares e.g. ours and fla fairly)")
        p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                       help="after timing, profile STEPS more steps per model and length: kernel time per "
                            "step by category (matmul, delta rule, attention, Inductor-fused, ...) and the "
                            "top kernels, printed and in the JSON (not with --interleave)")
        p.add_argument("--plain-loss", action="store_true",
                       help="our models: materialise the logits (default: fused linear cross-entropy)")
        p.add_argument("--activation-checkpointing", type=lambda s: _csv(str, s), default=["none"],
                       metavar="MODES", help="our models: comma-separated modes from none,mixer,mlp,block, one row "
                                             "each (recompute each token mixer / each MLP's gate and up "
                                             "projections / each whole block in backward)")
        p.add_argument("--regimes", type=lambda s: _csv(str, s), default=["autocast"], metavar="REGIMES",
                       help="comma-separated from autocast (float32 parameters, bf16 autocast) and bf16 "
                            "(bf16 parameters, no autocast); one row each (not with --interleave)")
        p.add_argument("--untied", action="store_true",
                       help="untied input/output embeddings for every model (fla's 374M DeltaNet shape)")
        p.add_argument("--recompute", action="store_true",
                       help="our models: rerun the DeltaNet mixer's norm, projections and conv in backward "
                            "instead of keeping the conv inputs (DeltaNetMixer.recompute_inputs = True)")
    return p


def cli_main(argv: list[str]) -> int:
    """``deltanet bench model [options]``; ``argv[0]`` names the benchmark."""
    if not argv or argv[0] != "model":
        print("usage: deltanet bench model [options]", file=sys.stderr)
        return 2
    what, argv = argv[0], argv[1:]
    import torch

    from deltanet.bench import model as bench

    p = build_parser(what)
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        print(f"deltanet bench {what}: no CUDA device; use --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    from deltanet.models import PRESETS
    from deltanet.models.configuration import ACTIVATION_CHECKPOINTING

    for m in args.models:
        if m != bench.FLA and m not in PRESETS:
            p.error(f"unknown model {m!r}; choose presets from {sorted(PRESETS)} or {bench.FLA}")
    bad = [m for m in args.activation_checkpointing if m not in ACTIVATION_CHECKPOINTING]
    if bad or not args.activation_checkpointing:
        p.error(f"--activation-checkpointing takes modes from {','.join(ACTIVATION_CHECKPOINTING)}; "
                f"got {bad or 'none'}")
    if args.interleave and args.activation_checkpointing != ["none"]:
        p.error("--activation-checkpointing is not supported with --interleave")
    if not args.regimes or any(r not in bench.REGIMES for r in args.regimes):
        p.error(f"--regimes takes values from {','.join(bench.REGIMES)}; got {args.regimes}")
    if args.interleave and (args.regimes != ["autocast"] or args.untied):
        p.error("--regimes and --untied are not supported with --interleave")
    if args.smoke:
        args.lengths, args.tokens, args.steps, args.warmup = [32, 64], 128, 2, 1

    env = bench.environment(device, " ".join(["deltanet", "bench", what, *argv]))
    if args.smoke:
        env["note"] = "SMOKE RUN: presets shrunk to tiny sizes, numbers meaningless"
    title, cols, rows = bench.train_sweep(
        args.models, args.lengths, tokens=args.tokens, steps=args.steps, warmup=args.warmup, device=device,
        smoke=args.smoke, compile_model=args.compile, interleave=args.interleave, profile=args.profile,
        plain_loss=args.plain_loss, activation_checkpointing=args.activation_checkpointing,
        recompute=args.recompute, regimes=args.regimes, untied=args.untied)
    table = bench.markdown(title, rows, cols, env)
    print(table)
    if args.out:
        bench.write_results(args.out, table, env, rows)
    return 0
