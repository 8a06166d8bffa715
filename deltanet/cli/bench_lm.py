"""``deltanet bench lm``: flags -> :class:`deltanet.bench.lm.ComparisonConfig` ->
:func:`~deltanet.bench.lm.run_comparison`."""

from __future__ import annotations

from pathlib import Path

from deltanet.cli import CliParser

__all__ = ["build_comparison_config", "build_parser", "cli_main"]


def build_parser() -> CliParser:
    from deltanet.bench import lm

    p = CliParser(prog="deltanet bench lm", description=lm.__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work directory: tokenizer, runs, results, figure")
    p.add_argument("--data", default="stdlib", help="data spec, as deltanet train --data (e.g. python-site)")
    p.add_argument("--models", default=",".join(lm.OURS),
                   help=f"comma list from {', '.join(lm.MODELS)}, or 'all' (default: ours, without fla)")
    p.add_argument("--scale", choices=sorted(lm.SCALES), default="125m")
    p.add_argument("--tokens", type=float, help="training tokens per model (rounded up to whole steps)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per micro-step")
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr-grid", help=f"comma list of peak learning rates, one job each (default {lm.DEFAULT_LR:g})")
    p.add_argument("--warmup", type=int, help="warmup steps (default 5%% of the steps)")
    p.add_argument("--vocab-size", type=int, help="size of the shared BPE tokenizer")
    p.add_argument("--tokenizer", help="use this tokenizer (a tokenizer.json or a directory) instead of training one")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--eval-tokens", type=int, help="held-out tokens per evaluation length")
    p.add_argument("--eval-batch-tokens", type=int, default=32768, help="tokens per evaluation forward")
    p.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget of this call (0 = none)")
    p.add_argument("--eval-reserve-s", type=float, help="seconds kept for evaluation when pausing for the budget")
    p.add_argument("--min-train-s", type=float, default=30.0, help="don't start a job with less training time left")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = auto)")
    p.add_argument("--cache-dir", type=Path, help="token cache (default OUT/tokens)")
    p.add_argument("--render-only", action="store_true", help="only render results.md and the figure")
    return p


def build_comparison_config(argv: list[str]):
    """The resolved :class:`~deltanet.bench.lm.ComparisonConfig` for ``deltanet bench lm`` arguments;
    bad values are ValueErrors naming the flag."""
    from deltanet.bench.lm import MODELS, ComparisonConfig

    args = vars(build_parser().parse_args(argv))
    models, lr_grid = args.pop("models"), args.pop("lr_grid")
    cfg = ComparisonConfig(**args).filled()  # the scale's sizes where a flag was left out
    for name in ("tokens", "seq_len", "batch_size", "grad_accum", "vocab_size", "eval_tokens", "eval_batch_tokens"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(cfg, name)}")
    cfg.models = list(MODELS) if models == "all" else [m.strip() for m in models.split(",") if m.strip()]
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown or not cfg.models:
        raise ValueError(f"--models: unknown {unknown or 'empty list'}; valid: {', '.join(MODELS)}, all")
    try:
        cfg.lr_grid = sorted({float(x) for x in lr_grid.split(",")}) if lr_grid else None
    except ValueError:
        raise ValueError(f"--lr-grid must be a comma list of numbers, got {lr_grid!r}") from None
    if cfg.lr_grid and min(cfg.lr_grid) <= 0:
        raise ValueError(f"--lr-grid values must be > 0, got {cfg.lr_grid}")
    return cfg.resolve()


def cli_main(argv: list[str]) -> int:
    """``deltanet bench lm --out DIR [flags]`` (see ``--help``)."""
    from deltanet.bench.lm import run_comparison

    return run_comparison(build_comparison_config(argv))
