"""benchmarks/gpu_train.py in its tiny CPU smoke mode: runs, and summarises what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ._helpers import env_1thread, make_corpus

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_train.py"


def test_gpu_train_script_smoke(tmp_path):
    data = make_corpus(tmp_path / "data")
    env = {**env_1thread(), "DELTANET_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "out"), "--smoke", "--max-time-s", "4",
                        "--data", str(data), "--", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] >= 1 and summary["tokens_per_s"] > 0 and summary["mfu"] is None  # no MFU on CPU
    assert summary["final_val_loss"] > 0 and summary["val_curve"][-1][1] == round(summary["final_val_loss"], 4)
    assert "tokens/s" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "run" / "loss.png").is_file()
    assert not (tmp_path / "out" / "run" / "checkpoints").exists()  # large; dropped unless --keep-checkpoints
