"""benchmarks/bench_context_parallel.py in its CPU smoke mode (2 gloo processes under torchrun):
it runs every part, and its gathered context-parallel outputs and gradients match the
single-device float32 run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_context_parallel_smoke(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(ROOT / "benchmarks" / "bench_context_parallel.py"), "--device", "cpu", "--out", str(tmp_path),
           "--lengths", "64,65", "--heads", "2", "--head-dim", "8", "--iters", "1", "--gated"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "context_parallel.json").read_text())
    assert [(row["T"], row["part"]) for row in res["rows"]] == [(64, "single"), (64, "cp"), (64, "accuracy")]
    assert res["errors"][0]["T"] == 65 and "not divisible" in res["errors"][0]["error"]
    errs = res["rows"][2]["errors_vs_fp32"]
    assert set(errs) == {"o", "dq", "dk", "dv", "dbeta", "dg"}
    assert all(e["cp"] < 1e-5 for e in errs.values()), errs
    assert res["rows"][1]["tokens_per_s"] > 0
    assert "| 64 | cp |" in (tmp_path / "context_parallel.md").read_text()
