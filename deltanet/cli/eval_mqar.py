"""``deltanet eval mqar``: flags -> :class:`~deltanet.evaluation.tasks.mqar.SweepConfig` and
:class:`~deltanet.evaluation.tasks.synthetic.TrainConfig` -> :func:`~deltanet.evaluation.tasks.mqar.run_sweep`."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from deltanet.cli import show_defaults

__all__ = ["build_parser", "cli_main"]


def build_parser() -> argparse.ArgumentParser:
    from deltanet.evaluation.tasks.synthetic import MODEL_PATTERNS

    p = argparse.ArgumentParser(
        prog="deltanet eval mqar",
        description="Train and evaluate models on multi-query associative recall (Zoology MQAR). "
        "Prints a table (best accuracy over the lr grid; in brackets steps / seconds to 99%), "
        "writes JSON with learning curves and a plot of accuracy vs model width.",
    )
    p.add_argument("--models", nargs="+", default=["delta_net", "linear_attention"],
                   help=f"model patterns, from {', '.join(MODEL_PATTERNS)}")
    # Defaults: a CPU-sized sweep (a few minutes on 2 cores) in which both models learn; the
    # paper's scale (T 512, 64 pairs, vocab 8192) is benchmarks/gpu_mqar.py, for GPUs.
    p.add_argument("--widths", nargs="+", type=int, default=[64], help="hidden sizes")
    p.add_argument("--seq-len", nargs="+", type=int, default=[64],
                   help="sequence length(s); zipped with --num-pairs (one value broadcasts)")
    p.add_argument("--num-pairs", nargs="+", type=int, default=[16], help="key-value pairs")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64,
                   help="head dimension; heads = max(1, width // head_dim)")
    p.add_argument("--sliding-window", type=int, default=64, help="window of hybrid-swa layers")
    p.add_argument("--lr", nargs="+", type=float, default=[3e-3], help="learning-rate grid")
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None, help="cap on optimizer steps")
    p.add_argument("--time-budget", type=float, default=None,
                   help="wall-clock seconds of training per run (evaluation not counted)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--stop-accuracy", type=float, default=None,
                   help="stop a run once held-out accuracy reaches this value")
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="after warmup: cosine decay over the planned steps, or constant "
                   "(better for --time-budget runs, which stop before the plan ends)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps (default 10%% of the planned steps, at most 500)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--output", type=Path, default=Path("runs/mqar"),
                   help="directory for results.json, accuracy_vs_width.png, learning_curves.png")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return show_defaults(p)


def _settings(seq_lens: list[int], pairs: list[int]) -> list[tuple[int, int]]:
    if len(seq_lens) == 1:
        seq_lens = seq_lens * len(pairs)
    if len(pairs) == 1:
        pairs = pairs * len(seq_lens)
    if len(seq_lens) != len(pairs):
        raise ValueError(
            f"--seq-len and --num-pairs must have the same number of values (or one), "
            f"got {len(seq_lens)} and {len(pairs)}"
        )
    return list(zip(seq_lens, pairs))


def cli_main(argv: list[str]) -> int:
    """Entry point of ``deltanet eval mqar``; parses ``argv`` (unknown flags are errors)."""
    from deltanet.evaluation.tasks.mqar import MQARSpec, SweepConfig, results_table, run_sweep, write_outputs
    from deltanet.evaluation.tasks.synthetic import TrainConfig, resolve_device

    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args.seq_len, args.num_pairs)
        for t, p in settings:
            MQARSpec(t, p, args.vocab_size)
        sweep = SweepConfig(
            models=args.models, widths=args.widths, settings=settings, lrs=args.lr,
            vocab_size=args.vocab_size, num_layers=args.layers, head_dim=args.head_dim,
            sliding_window=args.sliding_window, train_size=args.train_size,
            test_size=args.test_size, seed=args.seed,
        )
        train = TrainConfig(
            lr=args.lr[0], epochs=args.epochs, max_steps=args.max_steps,
            time_budget=args.time_budget, batch_size=args.batch_size,
            eval_every=args.eval_every,
            stop_accuracy=args.stop_accuracy, schedule=args.schedule, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, seed=args.seed, device=args.device,
        )
        cpu = resolve_device(args.device).type == "cpu"
    except ValueError as e:
        print(f"deltanet eval mqar: error: {e}", file=sys.stderr)
        return 2
    if cpu:  # as deltanet train does: two spinning OpenMP threads on a busy 2-core box are 10x slower
        from deltanet.training.distributed import configure_cpu_threads

        print(f"deltanet eval mqar: {configure_cpu_threads()}", file=sys.stderr)
    payload = {"command": "deltanet eval mqar " + " ".join(argv), "sweep": asdict(sweep),
               "train": asdict(train), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    results = run_sweep(
        sweep, train, progress=not args.no_progress,
        on_result=lambda res: write_outputs(args.output, payload, res),
    )
    print(results_table(results))
    print(f"wrote results.json, accuracy_vs_width.png and learning_curves.png to {args.output}/")
    return 0
