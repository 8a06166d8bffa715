"""benchmarks/bench_context_parallel.py in its CPU smoke mode (2 gloo processes under torchrun):
it runs every part (the op and two tiny hybrid models), and its gathered context-parallel
outputs, losses and gradients match the single-device float32 run."""

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
           "--lengths", "64,65", "--heads", "2", "--head-dim", "8", "--iters", "1", "--gated",
           "--models", "hybrid-swa-125m,hybrid-global-125m", "--model-override", "hidden_size=32",
           "--model-override", "num_hidden_layers=2", "--model-override", "num_heads=2",
           "--model-override", "intermediate_size=64", "--model-override", "vocab_size=128",
           "--model-override", "sliding_window=40"]  # window > the 32-token segments
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "context_parallel.json").read_text())
    models = [f"{m} {p}" for m in ("hybrid-swa-125m", "hybrid-global-125m") for p in ("single", "cp", "accuracy")]
    assert [(row["T"], row["part"]) for row in res["rows"]] == [(64, p) for p in ("single", "cp", "accuracy", *models)]
    assert res["errors"][0]["T"] == 65 and "not divisible" in res["errors"][0]["error"]
    errs = res["rows"][2]["errors_vs_fp32"]
    assert set(errs) == {"o", "dq", "dk", "dv", "dbeta", "dg"}
    assert all(e["cp"] < 1e-5 for e in errs.values()), errs
    assert res["rows"][1]["tokens_per_s"] > 0
    for row in (res["rows"][5], res["rows"][8]):  # the models' accuracy rows: float32 CP vs float32 1-device
        errs = row["errors_vs_fp32"]
        assert errs["loss"]["cp"] < 1e-6 and errs["grads"]["cp"] < 1e-5, errs
    assert res["rows"][4]["tokens_per_s"] > 0 and res["rows"][4]["model"] == "hybrid-swa-125m"
    assert "| 64 | cp |" in (tmp_path / "context_parallel.md").read_text()


def test_bench_context_parallel_packed_smoke(tmp_path):
    """``--doc-len``: packed documents spanning the ranks, with activation checkpointing, in the op
    and a model: float32 CP equals the 1-device run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           str(ROOT / "benchmarks" / "bench_context_parallel.py"), "--device", "cpu", "--out", str(tmp_path),
           "--lengths", "64", "--heads", "2", "--head-dim", "8", "--iters", "1", "--gated", "--doc-len", "12",
           "--models", "hybrid-swa-125m", "--model-override", "hidden_size=32",
           "--model-override", "num_hidden_layers=2", "--model-override", "num_heads=2",
           "--model-override", "intermediate_size=64", "--model-override", "vocab_size=128",
           "--model-override", "sliding_window=40", "--model-override", 'activation_checkpointing="block"']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "context_parallel.json").read_text())
    assert not res["errors"], res["errors"]
    rows = {row["part"]: row for row in res["rows"]}
    assert all(e["cp"] < 1e-5 for e in rows["accuracy"]["errors_vs_fp32"].values()), rows["accuracy"]
    errs = rows["hybrid-swa-125m accuracy"]["errors_vs_fp32"]
    assert errs["loss"]["cp"] < 1e-6 and errs["grads"]["cp"] < 1e-5, errs
    assert "packed documents of ~12 tokens" in (tmp_path / "context_parallel.md").read_text()
