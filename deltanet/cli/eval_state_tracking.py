"""``deltanet eval state-tracking``: flags ->
:class:`~deltanet.evaluation.tasks.state_tracking.StateTrackingConfig` and
:class:`~deltanet.evaluation.tasks.synthetic.TrainConfig` ->
:func:`~deltanet.evaluation.tasks.state_tracking.run_state_tracking`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from deltanet.cli import show_defaults

__all__ = ["build_parser", "cli_main"]


def build_parser() -> argparse.ArgumentParser:
    from deltanet.evaluation.tasks.state_tracking import BETA_RANGES, TASKS

    p = argparse.ArgumentParser(
        prog="deltanet eval state-tracking",
        description="Parity, addition mod 3 / mod 5 and S3 permutation composition, trained at one "
        "length and tested at 2x and 4x it, comparing DeltaNet with beta in (0,1) and in (0,2) "
        "(allow_neg_eigval); models such as delta_product-nh2 (no forget gate) and "
        "gated_delta_product-nh2 run DeltaProduct. Table "
        "cells: accuracy over all positions / over positions beyond the training length / "
        "at the last position.",
    )
    p.add_argument("--tasks", nargs="+", default=["parity", "mod5"], choices=sorted(TASKS))
    p.add_argument("--models", nargs="+", default=["delta_net"], help="model patterns")
    p.add_argument("--betas", nargs="+", default=list(BETA_RANGES), choices=list(BETA_RANGES))
    p.add_argument("--train-len", type=int, default=32)
    p.add_argument("--test-multiples", nargs="+", type=int, default=[2, 4])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lr", nargs="+", type=float, default=[3e-3], help="learning-rate grid")
    p.add_argument("--train-size", type=int, default=20_000)
    p.add_argument("--test-size", type=int, default=1_000)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, help="training seconds per run")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--output", type=Path, default=Path("runs/state_tracking"),
                   help="directory for results.json")
    p.add_argument("--no-progress", action="store_true")
    return show_defaults(p)


def cli_main(argv: list[str]) -> int:
    """Entry point of ``deltanet eval state-tracking`` (unknown flags are errors)."""
    from deltanet.evaluation.tasks.state_tracking import StateTrackingConfig, results_table, run_state_tracking
    from deltanet.evaluation.tasks.synthetic import TrainConfig, resolve_device

    args = build_parser().parse_args(argv)
    try:
        cfg = StateTrackingConfig(
            tasks=args.tasks, models=args.models, betas=args.betas, lrs=args.lr,
            train_len=args.train_len, test_multiples=args.test_multiples, width=args.width,
            num_layers=args.layers, head_dim=args.head_dim, train_size=args.train_size,
            test_size=args.test_size, seed=args.seed,
        )
        train = TrainConfig(
            lr=args.lr[0], epochs=args.epochs, max_steps=args.max_steps,
            time_budget=args.time_budget, batch_size=args.batch_size,
            eval_every=args.eval_every, weight_decay=args.weight_decay, seed=args.seed,
            device=args.device,
        )
        cpu = resolve_device(args.device).type == "cpu"
    except ValueError as e:
        print(f"deltanet eval state-tracking: error: {e}", file=sys.stderr)
        return 2
    if cpu:  # as deltanet train does: two spinning OpenMP threads on a busy 2-core box are 10x slower
        from deltanet.training.distributed import configure_cpu_threads

        print(f"deltanet eval state-tracking: {configure_cpu_threads()}", file=sys.stderr)
    payload = {"command": "deltanet eval state-tracking " + " ".join(argv), "config": asdict(cfg),
               "train": asdict(train), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def write(res: list[dict]) -> None:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.json").write_text(json.dumps({**payload, "results": res}, indent=1))

    results = run_state_tracking(cfg, train, progress=not args.no_progress, on_result=write)
    print(results_table(results, cfg.test_multiples))
    print(f"wrote {args.output / 'results.json'}")
    return 0
