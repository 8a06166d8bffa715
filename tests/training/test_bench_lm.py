"""``deltanet bench lm`` on CPU: two tiny models, results file, pause / resume / skip, report."""

from __future__ import annotations

import json
import re
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


def _result(model, lr, ppl, params=134_000_000):
    import math

    ev = {L: {"loss": math.log(ppl) + (0.1 if L != "2048" else 0.0), "ppl": ppl, "bpb": 1.0, "tokens": 1000,
              "recall": {"hit": {"loss": 1.0, "tokens": 300}, "other": {"loss": 2.0, "tokens": 700},
                         "hit_fraction": 0.3}} for L in ("2048", "4096", "8192")}
    from deltanet.bench.lm import MODELS

    return {"type": "result", "model": model, "label": MODELS[model].label, "lr": lr, "params": params,
            "tokens": 100_000_000, "eval": ev, "train_curve": [[131072, 9.0], [262144, 7.0]],
            "val_curve": [[262144, 7.1]], "tok_per_s_median": 250000.0, "note": "", "device": "H100",
            "torch": "2.11", "date": "2026-12-06"}


def test_report_best_lr_orderings_and_parameter_band(tmp_path):
    """The report from hand-made records: best lr per model, the paper's orderings, the 5% band."""
    from deltanet.bench.lm_report import best_per_model, orderings, render

    recs = [_result("deltanet", 1e-3, 30.0), _result("deltanet", 5e-4, 29.0),  # 5e-4 is DeltaNet's best
            _result("transformer", 1e-3, 31.0), _result("hybrid-swa", 1e-3, 29.5),
            _result("linear-attn-plain", 1e-3, 40.0, params=150_000_000)]
    best = best_per_model(recs, 2048)
    assert best["deltanet"]["lr"] == 5e-4 and set(best) == {"deltanet", "transformer", "hybrid-swa",
                                                            "linear-attn-plain"}
    lines = orderings(recs, 2048)
    # paper: SWA 27.06 < DeltaNet 28.24 < Transformer++ 28.39; ours: 29.5, 29.0, 31.0
    assert any(ln.startswith("- DeltaNet + sliding-window attention < DeltaNet (paper 27.06 < 28.24): "
                             "**does not hold** here (29.50 vs 29.00)") for ln in lines), lines
    assert any("DeltaNet < Transformer++ (RoPE, SwiGLU) (paper 28.24 < 28.39): **holds** here" in ln for ln in lines)
    assert len(lines) == 3  # the plain linear attention is not in the paper's table
    header = {"type": "protocol", "created": "2026-12-06", "scale": "125m",
              "data": {"spec": "python-site", "val_fraction": 0.05},
              "tokenizer": {"kind": "bpe", "vocab_size": 32000, "fingerprint": "abc"}, "seq_len": 2048,
              "tokens_per_step": 131072, "batch": "16 x 4 x 2048", "steps": 763, "tokens_per_model": 100007936,
              "optimizer": "AdamW", "schedule": "cosine", "lr": {"default": 1e-3, "grid": [5e-4, 1e-3]}, "seed": 0,
              "precision": "bf16", "eval": {"tokens": 2097152, "lengths": [2048, 4096, 8192], "recall_hit": "bigram"},
              "paper": "Table 1"}
    (tmp_path / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [header, *recs]) + "\n")
    md = render(tmp_path).read_text()
    assert "| DeltaNet **(best lr)** | 134.0M | 0.0005 | 100.0M | " in md
    assert "| DeltaNet | 134.0M | 0.001 |" in md  # the other grid point is listed too
    assert "150,000,000 parameters, +11.9% from DeltaNet's (outside the 5% band)" in md
    assert (tmp_path / "loss_vs_tokens.png").is_file()


def test_fla_yardsticks_go_through_the_same_loop(data, tmp_path, monkeypatch, capsys):
    """fla's plumbing without fla: a stand-in ``fla.models`` whose GLA / Mamba2 classes build small
    models of ours. Checks the factory path (fresh model, weights reloaded for evaluation), the
    shape the tool asks for, and that Mamba2 gets [B, T] rows without cu_seqlens."""
    import sys
    import types

    from deltanet.models import DeltaNetForCausalLM, get_config

    seen = {"gla": [], "mamba2": []}

    def make(kind):
        def model(cfg):
            m = DeltaNetForCausalLM(get_config("tiny", vocab_size=cfg["vocab_size"], hidden_size=32,
                                               num_hidden_layers=1, num_heads=2, intermediate_size=64))
            forward = m.forward

            def recording_forward(*a, **k):
                seen[kind].append(("cu_seqlens" in k, tuple(k["input_ids"].shape)))
                return forward(*a, **k)
            m.forward = recording_forward
            return m
        return model

    fake = types.ModuleType("fla.models")
    fake.GLAConfig = fake.Mamba2Config = lambda **kw: kw
    fake.GLAForCausalLM, fake.Mamba2ForCausalLM = make("gla"), make("mamba2")
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.models", fake)
    shapes = []
    real = fake.GLAConfig
    fake.GLAConfig = lambda **kw: shapes.append(("gla", kw)) or real(**kw)
    fake.Mamba2Config = lambda **kw: shapes.append(("mamba2", kw)) or real(**kw)

    out = tmp_path / "fla"
    assert main(_args(data, out, "--models", "fla-gla,fla-mamba2")) == 0
    recs = _records(out)
    assert [(r["type"], r.get("model")) for r in recs[1:]] == [("result", "fla-gla"), ("result", "fla-mamba2")]
    gla, mamba = recs[1], recs[2]
    assert gla["doc_mask"] and not mamba["doc_mask"] and "ignores cu_seqlens" in mamba["note"]
    # GLA: packed rows flattened with cu_seqlens; Mamba2: [B, T] rows (training batch 4 x 64)
    assert set(seen["gla"]) >= {(True, (1, 256))} and all(cu for cu, _ in seen["gla"])
    assert (False, (4, 64)) in seen["mamba2"] and not any(cu for cu, _ in seen["mamba2"])
    kinds = {k: kw for k, kw in shapes}
    assert kinds["gla"]["hidden_size"] == 64 and kinds["mamba2"]["num_hidden_layers"] == 2
    assert kinds["gla"]["vocab_size"] == 320  # the shared tokenizer's 300 tokens, padded to 64
    for r in (gla, mamba):
        assert r["eval"]["64"]["loss"] < 6.0 and r["train_curve"]


def test_comparison_config_takes_the_scale_and_checks_fields(tmp_path):
    """The typed config behind ``deltanet bench lm`` (the flags map onto it one to one)."""
    from deltanet.bench.lm import SCALES, ComparisonConfig
    from deltanet.cli.bench_lm import build_comparison_config

    cfg = ComparisonConfig(out=str(tmp_path), scale="smoke", seq_len=32, lr_grid=[2e-3, 1e-3, 2e-3]).resolve()
    s = SCALES["smoke"]
    assert (cfg.tokens, cfg.seq_len, cfg.batch_size, cfg.eval_reserve_s) == (s.tokens, 32, s.batch_size, 0.0)
    assert cfg.cache_dir == tmp_path / "tokens" and cfg.lr_grid == [1e-3, 2e-3]
    for bad, needle in [({"tokens": 0}, "tokens must be > 0"), ({"models": ["gpt"]}, "models: unknown ['gpt']"),
                        ({"lr_grid": [-1.0]}, "lr_grid values must be > 0"), ({"scale": "1b"}, "scale must be one of")]:
        with pytest.raises(ValueError, match=re.escape(needle)):
            ComparisonConfig(out=tmp_path, **bad).resolve()
    flags = build_comparison_config(["--out", str(tmp_path), "--scale", "smoke", "--seq-len", "32", "--lr-grid",
                                     "2e-3,1e-3", "--tokens", "1e3", "--models", "all"])
    assert flags.tokens == 1000 and flags.models[:2] == ["transformer", "deltanet"] and flags.lr_grid == [1e-3, 2e-3]
    assert flags == ComparisonConfig(out=tmp_path, scale="smoke", seq_len=32, lr_grid=[1e-3, 2e-3], tokens=1000,
                                     models=flags.models).resolve()
