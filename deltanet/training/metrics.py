"""Run metrics: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard, ``loss.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["MetricsLog", "last_validation", "plot_losses", "time_left"]


class MetricsLog:
    """``metrics.jsonl`` (one object per logged step) and TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.val_steps: set[int] = set()
        if not enabled:
            return
        if self.path.exists():  # drop records past the checkpoint we resume from (logged, then lost)
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
            from .checkpoint import write_text_atomic  # a kill mid-rewrite must not lose the kept records

            write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))
        import importlib.util

        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        self.f = self.path.open("a")

    def write(self, rec: dict) -> None:
        if "val_loss" in rec:
            self.val_steps.add(rec["step"])
        if not self.enabled:
            return
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])

    def has_val(self, step: int) -> bool:
        return step in self.val_steps

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def plot_losses(run_dir: Path) -> None:
    """``loss.png``: train loss per logged step and validation loss, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln]
    tr = [(r["step"], r["loss"]) for r in recs if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    va = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=120)
    plt.close(fig)


def last_validation(run_dir: Path) -> dict | None:
    """The last validation in ``metrics.jsonl`` as ``{"loss", "bpb", "ppl"}``, or None."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
    vals = [r for r in recs if "val_loss" in r]
    return {k: vals[-1][f"val_{k}"] for k in ("loss", "bpb", "ppl")} if vals else None


def time_left(steps_done: int, seconds: float, steps_left: int, budget_left: float) -> float:
    """Seconds until the run ends: by steps at this session's pace, or by the time budget if sooner.

    >>> time_left(10, 5.0, 20, 100.0), time_left(10, 5.0, 20, 3.0), time_left(10, 5.0, 0, 76.0)
    (10.0, 3.0, 0.0)
    """
    by_steps = seconds / max(1, steps_done) * steps_left
    return max(0.0, min(by_steps, budget_left))
