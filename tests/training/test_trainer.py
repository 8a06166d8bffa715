"""End-to-end training runs on CPU: loss falls, artifacts, exact resume, SIGTERM, DDP equivalence."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ._helpers import env_1thread, losses, run_cli, train_args


def test_loss_falls_and_artifacts(baseline):
    loss = losses(baseline)
    assert sorted(loss) == list(range(1, 13))
    assert sum(loss[s] for s in (10, 11, 12)) / 3 < sum(loss[s] for s in (1, 2, 3)) / 3 - 0.5
    for name in ("config.json", "tokenizer_meta.json", "metrics.jsonl", "loss.png", "checkpoints/latest"):
        assert (baseline / name).is_file(), name
    ckpt = baseline / "checkpoints" / (baseline / "checkpoints/latest").read_text().strip()
    assert ckpt.name == "step_00000012"
    for name in ("model.safetensors", "config.json", "optimizer.pt", "rng.pt", "trainer_state.json",
                 "tokenizer_meta.json"):
        assert (ckpt / name).is_file(), name
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["data_position"] == 12 * 4
    vals = [json.loads(x) for x in (baseline / "metrics.jsonl").read_text().splitlines() if "val_loss" in x]
    assert [v["step"] for v in vals] == [4, 8, 12]
    assert vals[-1]["val_loss"] < vals[0]["val_loss"]
    # bytes tokenizer: every target is one byte except EOS, so bpb is close to loss / ln 2
    assert abs(vals[-1]["val_bpb"] - vals[-1]["val_loss"] / 0.6931) < 0.1 * vals[-1]["val_bpb"]


def test_sigterm_saves_then_resume_matches_uninterrupted(baseline, corpus, tmp_path):
    """Interrupt a run mid-way with SIGTERM, resume it, and get the baseline's losses exactly."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deltanet.cli", *train_args(corpus, out, tmp_path / "cache", steps=12)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_1thread())
    deadline = time.time() + 240
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err  # not 0: `deltanet train && next` must stop
    assert (out / "loss.png").is_file()
    stopped = json.loads((sorted((out / "checkpoints").glob("step_*"))[-1] / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped < 12, "the run should have been interrupted mid-way"
    assert "interrupted by signal" in err and "--resume" in err

    # --resume alone restores the run's own settings (no need to repeat the flags)
    r = run_cli(["train", "--out", str(out), "--resume", "--no-progress"])
    assert r.returncode == 0, r.stderr
    assert losses(out) == losses(baseline)  # exact, step by step


def test_resume_without_checkpoint_is_an_error(baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    for p in (out / "checkpoints").glob("step_*"):
        shutil.rmtree(p)
    (out / "checkpoints" / "latest").unlink()
    r = run_cli(["train", "--out", str(out), "--resume", "--no-progress"])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("deltanet: error: --resume: no checkpoint in")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, baseline, tmp_path, mode):
    """2 gloo processes x batch 2 see the rows of 1 process x batch 4: same losses (DDP and FSDP2)."""
    out = tmp_path / mode
    args = train_args(corpus, out, tmp_path / "cache", *(["--fsdp"] if mode == "fsdp" else []), steps=12)
    args[args.index("--batch-size") + 1] = "2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "deltanet.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env_1thread())
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = losses(out), losses(baseline)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=2e-4, rel=1e-4), s
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["fsdp"] == (mode == "fsdp")
    assert r.stdout.count("validation loss") == 1  # only rank 0 reports


def test_model_factory_and_stop_at_pause_then_resume_match_the_preset_run(baseline, corpus, tmp_path, monkeypatch):
    """A model built by ``model_factory`` (here the baseline's own shape, so the numbers can be
    compared), paused by ``stop_at`` after 6 steps and resumed with the factory, trains exactly
    as the uninterrupted preset run: the weights come back from the checkpoint and the
    schedule ignores the pause."""
    import time as real_time

    from deltanet.cli.train import build_train_config
    from deltanet.models import DeltaNetForCausalLM, get_config
    from deltanet.training import trainer

    class Clock:  # the trainer's clock jumps an hour ahead once 6 training forwards have run
        offset = 0.0

        def time(self):
            return real_time.time() + self.offset

        def __getattr__(self, name):
            return getattr(real_time, name)

    clock = Clock()
    monkeypatch.setattr(trainer, "time", clock)
    calls = []

    def factory(vocab_size):
        model = DeltaNetForCausalLM(get_config("tiny", vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                               num_heads=2, intermediate_size=128))

        def hook(module, args, out):
            if module.training:
                calls.append(1)
                if len(calls) == 6:
                    clock.offset = 3600.0
        model.register_forward_hook(hook)
        return model

    out = tmp_path / "run"
    cfg = build_train_config(train_args(corpus, out, tmp_path / "cache", steps=12)[1:] + ["--preset", "foreign"])
    res = trainer.train(cfg, model_factory=factory, stop_at=real_time.time() + 1800)
    assert res.interrupted and res.step == 6
    clock.offset = 0.0
    cfg = build_train_config(["--out", str(out), "--resume", "--no-progress"])
    res = trainer.train(cfg, model_factory=factory)
    assert not res.interrupted and res.step == 12
    got, want = losses(out), losses(baseline)
    assert sorted(got) == sorted(want) == list(range(1, 13))
    assert [got[s] for s in want] == pytest.approx([want[s] for s in want], rel=1e-4)


@pytest.mark.parametrize("loss", ["fused", "plain"])
def test_resumed_run_trains_in_train_mode_exactly_as_the_uninterrupted_one(corpus, tmp_path, monkeypatch, loss):
    """A checkpoint's weights come back through ``from_pretrained``, which returns the model in
    eval mode. Every training forward must still run in train mode (the fused loss and activation
    checkpointing only act there): the resumed run then computes the loss by the same code path
    and gets the uninterrupted run's losses bit for bit. The fused loss is the default;
    ``--plain-loss`` keeps the logits."""
    from deltanet.cli.train import build_train_config
    from deltanet.models import DeltaNetForCausalLM
    from deltanet.training import trainer

    seen = []  # (model.training, logits kept) of every forward that records autograd: the training ones
    forward = DeltaNetForCausalLM.forward

    def recording(self, *args, **kw):
        out = forward(self, *args, **kw)
        if torch.is_grad_enabled():
            seen.append((self.training, out.logits is not None))
        return out

    monkeypatch.setattr(DeltaNetForCausalLM, "forward", recording)
    flags = ["--plain-loss"] if loss == "plain" else []
    out = tmp_path / "run"
    args = train_args(corpus, out, tmp_path / "cache", *flags, "--save-every", "2", "--threads", "1", steps=4)[1:]
    trainer.train(build_train_config(args))
    want = [(True, loss == "plain")]
    assert seen == want * 4
    expected = losses(out)
    # resume from the step-2 checkpoint, as if the run had been killed after saving it
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    seen.clear()
    res = trainer.train(build_train_config(["--out", str(out), "--resume", "--no-progress"]))
    assert res.step == 4 and seen == want * 2
    assert losses(out) == expected  # exact, step by step
