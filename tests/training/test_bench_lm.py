"""``deltanet bench lm`` on CPU: two tiny models, results file, pause / resume / skip, report."""

from __future__ import annotations

import json
import time as real_time

import pytest

from deltanet.cli import main

from ._helpers import make_corpus


def _args(data, out, *extra):
    return ["bench", "lm", "--out", str(out), "--scale", "smoke", "--data", str(data), "--val-fraction", "0.25",
            "--threads", "1", "--device", "cpu", *extra]


def _records(out):
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("lm") / "data", n_files=16)


def test_pause_resume_skip_and_report(data, tmp_path, monkeypatch, capsys):
    from deltanet.training import trainer

    # the reference: deltanet trained straight through
    assert main(_args(data, tmp_path / "ref", "--models", "deltanet")) == 0
    ref = _records(tmp_path / "ref")[1]

    # 1) the budget runs out after 3 of the 6 steps: the trainer's clock jumps past the deadline
    class Clock:
        offset = 0.0

        def time(self):
            return real_time.time() + self.offset

        def __getattr__(self, name):
            return getattr(real_time, name)

    clock, steps, step = Clock(), [], trainer._Run._step

    def counted_step(self, *a, **k):
        r = step(self, *a, **k)
        steps.append(1)
        if len(steps) == 3:
            clock.offset = 1e7
        return r

    monkeypatch.setattr(trainer, "time", clock)
    monkeypatch.setattr(trainer._Run, "_step", counted_step)
    out = tmp_path / "cmp"
    args = _args(data, out, "--models", "deltanet,transformer", "--budget-s", "1000000")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[deltanet-lr0.001] paused at step 3/6" in err and "transformer" not in err
    recs = _records(out)
    assert [r["type"] for r in recs] == ["protocol"]  # nothing finished yet
    assert "No finished model yet" in (out / "results.md").read_text()
    monkeypatch.undo()

    # 2) the next call resumes deltanet from its checkpoint, then trains the transformer
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[deltanet-lr0.001] resuming at step 3" in err and "[transformer-lr0.001] training" in err
    recs = _records(out)
    assert [(r["type"], r.get("model")) for r in recs] == [("protocol", None), ("result", "deltanet"),
                                                           ("result", "transformer")]
    dn, tf = recs[1], recs[2]
    # paused and resumed = straight through: same held-out numbers at every length
    for L in ("64", "128", "256"):
        assert dn["eval"][L]["loss"] == pytest.approx(ref["eval"][L]["loss"], rel=1e-4)
    assert dn["steps"] == 6 and dn["tokens"] == 6 * 4 * 64 and dn["lr"] == 1e-3
    assert abs(dn["params"] / tf["params"] - 1) < 0.05
    for r in (dn, tf):
        ev = r["eval"]
        assert set(ev) == {"64", "128", "256"}
        # the same held-out tokens at every length: one fewer target per row, rows 2x / 4x longer
        assert ev["64"]["tokens"] // 63 == 2 * (ev["128"]["tokens"] // 127) == 4 * (ev["256"]["tokens"] // 255)
        rec = ev["64"]["recall"]
        assert rec["hit"]["tokens"] + rec["other"]["tokens"] == ev["64"]["tokens"] and rec["hit"]["tokens"] > 0
        assert r["train_curve"] and r["val_curve"] and r["train_curve"][-1][0] == 6 * 256
    header = recs[0]
    assert header["steps"] == 6 and header["tokens_per_step"] == 256 and header["seq_len"] == 64
    assert header["tokenizer"]["vocab_size"] == 300

    # 3) a third call skips both; nothing is appended
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[deltanet-lr0.001] done already: skipped" in err and "[transformer-lr0.001] done already" in err
    assert len(_records(out)) == 3

    # the report: one row per model, the paper's ordering checked, the figure
    md = (out / "results.md").read_text()
    assert "| DeltaNet | " in md and "| Transformer++ (RoPE, SwiGLU) | " in md
    assert "DeltaNet < Transformer++ (RoPE, SwiGLU) (paper 28.24 < 28.39)" in md
    assert (out / "loss_vs_tokens.png").stat().st_size > 10_000
    assert main(["bench", "lm", "--out", str(out), "--render-only"]) == 0

    # 4) another protocol in the same results file is refused
    assert main(_args(data, out, "--models", "deltanet", "--seq-len", "32")) == 1
    assert "another protocol: seq_len is 64 there, 32 now" in capsys.readouterr().err


def test_fla_models_say_fla_is_missing(data, tmp_path, capsys):
    try:
        import fla  # noqa: F401

        pytest.skip("fla is installed here")
    except ModuleNotFoundError:
        pass
    assert main(_args(data, tmp_path / "o", "--models", "fla-gla", "--tokens", "256")) == 1
    assert "[fla-gla-lr0.001] skipped: fla is not installed" in capsys.readouterr().err
    assert [r["type"] for r in _records(tmp_path / "o")] == ["protocol"]


@pytest.mark.parametrize("argv,needle", [
    (["--models", "deltanet,nope"], "--models: unknown ['nope']"),
    (["--lr-grid", "1e-3,abc"], "--lr-grid must be a comma list of numbers"),
    (["--tokens", "0"], "--tokens must be > 0"),
])
def test_bad_arguments(data, tmp_path, capsys, argv, needle):
    assert main(_args(data, tmp_path / "o", *argv)) in (1, 2)
    assert needle in capsys.readouterr().err
