"""``deltanet eval harness``: a checkpoint on lm-evaluation-harness tasks
(:func:`deltanet.evaluation.harness.evaluate`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["build_parser", "cli_main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltanet eval harness",
        description="Evaluate a checkpoint with lm-evaluation-harness (pip install "
        "'deltanet[eval]'). Hub datasets need network access; local YAML tasks over JSONL "
        "files work offline through --include-path.",
    )
    p.add_argument("checkpoint", help="run directory (its latest checkpoint) or checkpoint directory")
    p.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names")
    p.add_argument("--include-path", type=Path, default=None, help="directory of local task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None,
                   help="documents per task (an int), or a fraction (< 1)")
    p.add_argument("--batch-size", default="1", help="int or 'auto'")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep per-document responses in the JSON")
    return p


def cli_main(argv: list[str]) -> int:
    """Entry point of ``deltanet eval harness`` (unknown flags are errors)."""
    args = build_parser().parse_args(argv)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    from deltanet.evaluation.harness import evaluate

    try:  # evaluate imports lm-eval first: a missing lm-eval is an ImportError naming the fix
        results = evaluate(
            args.checkpoint, args.tasks, include_path=args.include_path,
            num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
            device=args.device, dtype=args.dtype, log_samples=args.log_samples, seed=args.seed,
        )
    except (ImportError, ValueError) as e:  # CheckpointError / TokenizerError are ValueErrors
        print(f"deltanet eval harness: error: {e}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=1, default=str))
        print(f"wrote {args.output}")
    return 0
