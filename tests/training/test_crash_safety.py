"""Crash safety: SIGKILL a CPU training run at random moments, resume each time, get the same run.

Also: resuming a run that already reached its end reports it and exits 0 (it used to crash),
and the thread count a run started with is reused on resume (exactness on CPU depends on it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deltanet.training.checkpoint import find_checkpoint, list_checkpoints
from deltanet.training.metrics import time_left

from ._helpers import BASELINE_STEPS as STEPS
from ._helpers import env_1thread, losses, run_cli, train_args


def _env_default_threads() -> dict:
    # torch's own default (all cores): auto would pick more than the 1 thread the run started
    # with whenever the machine is idle enough, so a resume must use the recorded count.
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _newest_step(out: Path) -> int:
    ckpts = list_checkpoints(out)
    return int(ckpts[-1].name.split("_")[1]) if ckpts else 0


def test_sigkill_at_random_moments_then_resume_is_exact(baseline, corpus, tmp_path):
    """Kill -9 at seeded-random moments (checkpoints every 2 steps), resume each time: the
    losses equal the uninterrupted run's step for step, each logged once."""
    rng = random.Random(20261206)
    # kill once checkpoint `target` exists, then up to 0.15 s later (about a step here): inside a
    # step, a validation, a checkpoint write; the last kill comes after the final checkpoint
    targets = [*sorted(rng.sample(range(2, STEPS, 2), 3)), STEPS]
    out = tmp_path / "run"
    fresh = train_args(corpus, out, tmp_path / "cache", "--save-every", "2", steps=STEPS)
    resume = ["train", "--out", str(out), "--resume", "--no-progress"]
    killed_at, resumed_logs = [], []
    for target in targets:
        started = bool(list_checkpoints(out))
        cmd = [sys.executable, "-m", "deltanet.cli", *(resume if started else fresh)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env=_env_default_threads() if started else env_1thread())
        deadline = time.time() + 240
        while proc.poll() is None and _newest_step(out) < target and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.kill()
            killed_at.append(_newest_step(out))
        log = proc.communicate(timeout=240)[1]
        assert proc.returncode in (0, -9), log
        if started:
            resumed_logs.append(log)
    print(f"kill targets {targets}, killed after checkpoints {killed_at}")
    assert len(killed_at) >= 3, f"too few kills landed (targets {targets}, killed at {killed_at})"
    r = subprocess.run([sys.executable, "-m", "deltanet.cli", *resume], capture_output=True, text=True,
                       timeout=300, env=_env_default_threads())
    assert r.returncode == 0, r.stderr

    assert losses(out) == losses(baseline), f"killed after checkpoints {killed_at}"  # exact
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in recs if not r.get("final")] == list(range(1, STEPS + 1))  # no step twice
    assert (out / "loss.png").is_file()

    # the thread count the run started with (1) is recorded and reused by every resume
    assert json.loads((find_checkpoint(out) / "trainer_state.json").read_text())["threads"] == 1
    assert json.loads((out / "config.json").read_text())["threads"] == 1
    trained = [log for log in resumed_logs + [r.stderr] if "model tiny" in log]  # not killed while starting
    assert trained and all("1 thread(s) as recorded by the run" in log for log in trained), trained

    # once more, without the `latest` pointer: the run is complete, nothing to do, exit 0
    (out / "checkpoints" / "latest").unlink()
    r = run_cli(resume)
    assert r.returncode == 0, r.stderr
    assert f"is already complete: step_{STEPS:08d}" in r.stderr and f"already complete at step {STEPS}" in r.stdout
    assert losses(out) == losses(baseline)


def test_resume_of_a_finished_run_killed_before_it_exited(baseline, tmp_path):
    """Killed after its last checkpoint (no loss.png yet): --resume says it is complete, exits 0."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    (out / "loss.png").unlink()
    before = (out / "metrics.jsonl").read_text()
    r = run_cli(["train", "--out", str(out), "--resume", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert f"is already complete: step_{STEPS:08d} reached max_steps={STEPS}" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing re-done, nothing logged twice
    assert (out / "loss.png").is_file()


def test_progress_time_left_is_an_estimate_not_the_budget():
    # 100% of the steps done with 76 s of budget left: nothing is left
    assert time_left(steps_done=30, seconds=15.0, steps_left=0, budget_left=76.0) == 0.0
    assert time_left(steps_done=10, seconds=5.0, steps_left=20, budget_left=76.0) == 10.0
    assert time_left(steps_done=10, seconds=5.0, steps_left=200, budget_left=76.0) == 76.0
    assert time_left(steps_done=0, seconds=0.0, steps_left=5, budget_left=-3.0) == 0.0


def test_interrupt_before_the_first_resumed_step_keeps_the_checkpoint(corpus, tmp_path, monkeypatch):
    """Re-saving the step it resumed from would move the checkpoint aside for a moment (a kill
    then would leave `latest` dangling): an interrupt before any new step saves nothing."""
    import signal

    import torch

    from deltanet.cli.train import build_train_config
    from deltanet.training import trainer

    n_threads = torch.get_num_threads()
    args = train_args(corpus, tmp_path / "run", tmp_path / "cache", "--threads", "1", steps=2)[1:]
    try:
        assert trainer.train(build_train_config(args)).step == 2
        ckpt = find_checkpoint(tmp_path / "run")
        inode = ckpt.stat().st_ino

        def stop_at_once(self):
            self.signum = signal.SIGTERM
            return self

        monkeypatch.setattr(trainer._StopFlag, "__enter__", stop_at_once)
        res = trainer.train(build_train_config(["--out", str(tmp_path / "run"), "--resume", "--max-steps", "4",
                                                "--no-progress"]))
    finally:
        torch.set_num_threads(n_threads)
    assert res.interrupted and res.signum == signal.SIGTERM and res.step == 2
    assert find_checkpoint(tmp_path / "run") == ckpt and ckpt.stat().st_ino == inode
    assert not list((tmp_path / "run" / "checkpoints").glob(".old-*"))
