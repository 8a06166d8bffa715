"""Shared bits for the training tests: a small corpus, tiny-model flags, subprocess runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BASELINE_STEPS = 12  # length of the shared uninterrupted run (the ``baseline`` fixture)

# A tiny model that trains in a second per few steps on one CPU thread.
TINY_MODEL = ["--model", "hidden_size=64", "--model", "num_hidden_layers=2", "--model", "num_heads=2",
              "--model", "intermediate_size=128"]


def make_corpus(root: Path, n_files: int = 12) -> Path:
    """Small deterministic Python-ish corpus of ``n_files`` files."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (root / f"m{i:02d}.py").write_text(f'"""module {i}"""\n' + body)
    return root


def train_args(data: Path, out: Path, cache: Path, *extra: str, steps: int = 8) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--cache-dir", str(cache), "--tokenizer", "bytes",
            "--seq-len", "32", "--batch-size", "4", "--max-steps", str(steps), "--warmup", "2", "--lr", "3e-3",
            "--eval-every", "4", "--eval-batches", "2", "--log-every", "1", "--sample-tokens", "8",
            "--no-progress", *TINY_MODEL, *extra]


def env_1thread() -> dict:
    # On a 2-core CI box with other workers, one thread per process is far faster than two
    # (OpenMP spin-waits under contention) and makes timings stable.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_cli(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deltanet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env_1thread(), **kw)


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {r["step"]: r["loss"] for r in recs if not r.get("final")}
