"""benchmarks/mqar_decay_probe.py: its run options do what they say, and it runs end to end."""

import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def probe(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    return importlib.import_module("mqar_decay_probe")


ARGS = SimpleNamespace(vocab_size=32, head_dim=16, seq_len=16)


@pytest.mark.parametrize("spec, match", [
    ("gate=one,colour=red", "bad option 'colour=red'"),
    ("gate", "bad option 'gate'"),
    ("gate=tanh", "gate must be"),
    ("model=linear_attention", "model must be"),
    ("alr=0.1,afix=1", "alr must be > 0 and cannot be combined"),
    ("alr=0", "alr must be > 0"),
    ("gate=one,glr=0.1", "glr must be > 0 and needs a trained gate"),
])
def test_bad_run_specs(probe, spec, match):
    with pytest.raises(ValueError, match=match):
        probe.parse_run(spec)


def test_options_shape_the_model(probe):
    base = probe.build(probe.parse_run("gate=one,A=0:0.16"), ARGS, 16)
    m0 = probe.mixers(base)[0]
    assert not m0.use_output_gate and not m0.g_proj.weight.requires_grad
    assert 0 < float(m0.A_log.detach().exp()) <= 0.16

    frozen = probe.mixers(probe.build(probe.parse_run("freeze=1"), ARGS, 16))[0]
    assert not any(p.requires_grad for p in (frozen.a_proj.weight, frozen.A_log, frozen.dt_bias))
    afix = probe.mixers(probe.build(probe.parse_run("afix=1"), ARGS, 16))[0]
    assert not afix.a_proj.weight.requires_grad and afix.A_log.requires_grad and afix.dt_bias.requires_grad

    off = probe.mixers(probe.build(probe.parse_run("A=off"), ARGS, 16))[0]
    assert float(off.A_log.detach().exp()) < 1e-20
    start = probe.mixers(probe.build(probe.parse_run("A0=0.136,dt0=0.073,azero=1"), ARGS, 16))[0]
    assert float(start.A_log.detach().exp()) == pytest.approx(0.136)
    assert float(torch.nn.functional.softplus(start.dt_bias.detach())) == pytest.approx(0.073)
    assert float(start.a_proj.weight.detach().abs().max()) == 0.0
    half = probe.mixers(probe.build(probe.parse_run("gate=sigmoid,gatefix=1,A=off"), ARGS, 16))[0]
    x = torch.randn(2, 5, 16)
    assert torch.sigmoid(half.g_proj(x)).eq(0.5).all() and not half.g_proj.weight.requires_grad


def test_alr_is_a_smaller_adam_step(probe):
    """``alr=c`` keeps the initial weight and makes Adam's step on ``a_proj`` c times smaller."""
    full = probe.build(probe.parse_run(""), ARGS, 16)
    slow = probe.build(probe.parse_run("alr=0.1"), ARGS, 16)
    wf, ws = probe.mixers(full)[0].a_proj, probe.mixers(slow)[0].a_proj
    torch.testing.assert_close(ws.weight, wf.weight, rtol=1e-6, atol=0)
    x = torch.randn(4, 16)
    steps = []
    for lin in (wf, ws):
        before = lin.weight.detach().clone()
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
        lin(x).pow(2).sum().backward()
        opt.step()
        steps.append(lin.weight.detach() - before)
    torch.testing.assert_close(steps[1], 0.1 * steps[0], rtol=1e-4, atol=1e-9)


def test_end_to_end_logs_the_decay(probe, tmp_path):
    out = tmp_path / "p"
    rc = probe.main(["--out", str(out), "--runs", "gate=one,A=0:0.16", "alr=0.1", "--seq-len", "16",
                     "--num-pairs", "4", "--vocab-size", "32", "--widths", "16", "--head-dim", "16",
                     "--train-size", "64", "--test-size", "16", "--epochs", "1", "--eval-every", "1",
                     "--grad-snr", "2", "--batch-size", "16"])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["spec"] for r in runs] == ["gate=one,A=0:0.16", "alr=0.1"]
    for r in runs:
        assert r["result"]["steps"] == 4 and len(r["log"]) == 1 + 4
        for row in r["log"]:
            for layer in ("layer0", "layer1"):
                st = row[layer]
                assert st["g_min"] <= st["g_p5"] <= st["g_median"] <= 0
                assert 0 < st["surv64_p5"] <= st["surv64_mean"] <= 1
                # the window is the whole sequence here: survival = exp(sum of g) >= exp(16 g_min)
                assert st["surv64_p5"] >= math.exp(16 * st["g_min"]) - 1e-6
                assert st["A"][0] > 0 and st["dt_max"] >= st["dt_median"] > 0
                assert all(k in st for k in ("g_mean_kv_key", "g_mean_kv_value", "g_mean_query", "g_mean_filler"))
        snr = r["log"][-1]["grad_snr"]
        assert set(snr) >= {"L0.a_proj", "L0.q_proj", "L1.o_proj"} and all(v >= 0 for v in snr.values())
    assert "| `alr=0.1` | 16 |" in (out / "table.md").read_text()
