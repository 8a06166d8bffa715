"""MQAR: generator invariants, the training loop, a tiny run that must learn, the CLI."""

import json
import math

import numpy as np
import pytest
import torch

from deltanet.cli.eval_mqar import cli_main
from deltanet.evaluation.tasks.mqar import (
    IGNORE_INDEX,
    MQARSpec,
    _uniform_distinct,
    make_mqar,
    power_law_probs,
)
from deltanet.evaluation.tasks.synthetic import (
    MODEL_PATTERNS,
    TrainConfig,
    build_model,
    layer_types_for,
    masked_accuracy,
    target_logits,
    train_and_evaluate,
)

SETTINGS = [(64, 4, 256), (128, 16, 8192), (512, 64, 8192), (33, 8, 16)]


@pytest.mark.parametrize("T,P,V", SETTINGS, ids=[f"T{t}-P{p}-V{v}" for t, p, v in SETTINGS])
def test_structure(T, P, V):
    x, y = make_mqar(200, T, P, V, seed=3)
    assert x.shape == y.shape == (200, T) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < V
    half = V // 2
    keys, values = x[:, 0 : 2 * P : 2], x[:, 1 : 2 * P : 2]
    # keys from the first half, values from the second, distinct within each example
    assert bool((keys < half).all()) and bool((values >= half).all())
    assert all(len(set(r.tolist())) == P for r in keys)
    assert all(len(set(r.tolist())) == P for r in values)
    # the prefix has no targets; exactly P targets per example, each at an even offset after it
    tgt = y != IGNORE_INDEX
    assert not bool(tgt[:, : 2 * P].any())
    assert bool((tgt.sum(1) == P).all())
    pos = tgt.nonzero()
    assert bool(((pos[:, 1] - 2 * P) % 2 == 0).all())
    # every key is queried exactly once, and the target there is that key's value
    for b in range(0, 200, 17):
        q = tgt[b].nonzero().flatten()
        kv = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert sorted(x[b, q].tolist()) == sorted(kv)
        assert [kv[k] for k in x[b, q].tolist()] == y[b, q].tolist()
    # every other target is the ignore index, never a real token
    assert set(y[~tgt].unique().tolist()) == {IGNORE_INDEX}


def test_deterministic_by_seed():
    a = make_mqar(50, 64, 8, 512, seed=7)
    b = make_mqar(50, 64, 8, 512, seed=7)
    c = make_mqar(50, 64, 8, 512, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_query_gaps_follow_power_law():
    T, P = 64, 4
    _, y = make_mqar(20_000, T, P, 256, seed=0)
    gaps = (y != IGNORE_INDEX).nonzero()[:, 1].sub(2 * P).div(2, rounding_mode="floor")
    n_gaps = MQARSpec(T, P, 256).num_gaps
    hist = torch.bincount(gaps, minlength=n_gaps).double()
    # Reference: Zoology's own sampler, numpy.random.choice(replace=False, p=...), one row at a
    # time -- independent of our vectorised Gumbel-top-k.
    rng = np.random.default_rng(1)
    p = power_law_probs(n_gaps).numpy()
    m = 20_000
    ref_draws = np.concatenate([rng.choice(n_gaps, size=P, replace=False, p=p) for _ in range(m)])
    ref = torch.from_numpy(np.bincount(ref_draws, minlength=n_gaps)).double()
    # short gaps are the most frequent
    assert hist[0] > hist[n_gaps // 2] > 0
    # two-sample chi-square: both histograms carry multinomial noise, hence the (1 + N/M)
    ref = ref * (hist.sum() / ref.sum())
    chi2 = float(((hist - ref) ** 2 / (ref.clamp_min(1) * (1 + 20_000 / m))).sum())
    assert chi2 < 2 * n_gaps, chi2  # ~n_gaps expected; a wrong law gives hundreds


def test_power_law_probs():
    p = power_law_probs(10, 0.01)
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    assert bool((p[:-1] > p[1:]).all())
    assert math.isclose(float(p[0] / p[1]), 2 ** 0.99, rel_tol=1e-9)
    with pytest.raises(ValueError, match="num_gaps"):
        power_law_probs(0)


def test_uniform_distinct_is_uniform():
    gen = torch.Generator().manual_seed(0)
    x = _uniform_distinct(8, 40_000, 6, gen)  # many collisions to resolve
    assert all(len(set(r)) == 6 for r in x[:500].tolist())
    # each slot is uniform over the 8 labels (a biased redraw would skew the later slots)
    for slot in (0, 5):
        freq = torch.bincount(x[:, slot], minlength=8).double() / 40_000
        assert float((freq - 1 / 8).abs().max()) < 0.01


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=15, num_pairs=4, vocab_size=64), "seq_len must be >= 4"),
        (dict(seq_len=64, num_pairs=4, vocab_size=6), "vocab_size must be >= 2"),
        (dict(seq_len=0, num_pairs=4, vocab_size=64), "seq_len"),
        (dict(seq_len=64, num_pairs=0, vocab_size=64), "num_pairs"),
        (dict(seq_len=64, num_pairs=4, vocab_size=64, power_a=0.0), "power_a"),
        (dict(seq_len=64.0, num_pairs=4, vocab_size=64), "seq_len"),
    ],
    ids=["short-seq", "small-vocab", "zero-len", "zero-pairs", "bad-power", "float-len"],
)
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_mqar(4, **kwargs)


def test_bad_num_examples():
    with pytest.raises(ValueError, match="num_examples"):
        make_mqar(0, 64, 4, 64)


def test_layer_patterns():
    assert layer_types_for("hybrid-swa", 2) == ["delta_net", "sliding_attention"]
    assert layer_types_for("hybrid-global", 2) == ["delta_net", "full_attention"]
    assert layer_types_for("hybrid-global", 8).count("full_attention") == 2
    with pytest.raises(ValueError, match="pattern"):
        layer_types_for("mamba", 2)
    with pytest.raises(ValueError, match="pattern"):
        layer_types_for("full_attention-noconv", 2)


def test_ablation_variants_configure_the_mixer():
    kw = dict(width=32, num_layers=2, vocab_size=64, head_dim=16)
    plain = build_model("linear_attention-plain", **kw).config
    assert plain.layer_types == ["linear_attention"] * 2
    assert (plain.use_short_conv, plain.qk_activation, plain.qk_norm) == (False, "elu", "sum")
    noconv = build_model("delta_net-noconv", **kw).config
    assert noconv.layer_types == ["delta_net"] * 2 and not noconv.use_short_conv
    assert noconv.qk_norm == "l2"
    # explicit overrides win over the variant's
    assert build_model("delta_net-noconv", use_short_conv=True, **kw).config.use_short_conv


def test_gated_recall_variants():
    """``gated_delta_net-sigmoid`` / ``-slowdecay`` / ``-sigmoid+slowdecay``: the sigmoid output
    gate and the 100x weaker initial decay (A ~ U(0, 0.16)), alone and together."""
    kw = dict(width=32, num_layers=2, vocab_size=64, head_dim=16)
    for name, act, rng in [("sigmoid", "sigmoid", (0.0, 16.0)), ("slowdecay", "silu", (0.0, 0.16)),
                           ("sigmoid+slowdecay", "sigmoid", (0.0, 0.16))]:
        model = build_model(f"gated_delta_net-{name}", **kw)
        cfg = model.config
        assert cfg.layer_types == ["gated_delta_net"] * 2
        assert (cfg.output_gate_activation, cfg.A_init_range) == (act, rng)
        for layer in model.model.layers:
            assert layer.attn.o_norm.gate_activation == act and layer.attn.A_log.exp().max() <= rng[1] * 1.001


@pytest.mark.parametrize("pattern", MODEL_PATTERNS)
def test_target_logits_match_full_forward(pattern):
    torch.manual_seed(0)
    model = build_model(pattern, width=32, num_layers=2, vocab_size=64, head_dim=16, sliding_window=8)
    x, y = make_mqar(3, 32, 4, 64, seed=0)
    mask = y != IGNORE_INDEX
    full = model(x).logits[mask]
    torch.testing.assert_close(target_logits(model, x, mask), full, rtol=1e-5, atol=1e-5)


def test_masked_accuracy_counts_only_targets():
    torch.manual_seed(0)
    model = build_model("delta_net", width=32, num_layers=1, vocab_size=16, head_dim=16)
    x = torch.randint(0, 16, (4, 8))
    with torch.no_grad():
        pred = model(x).logits.argmax(-1)
    y = torch.full_like(x, IGNORE_INDEX)
    y[:, 2] = pred[:, 2]  # right at position 2
    y[:, 5] = (pred[:, 5] + 1) % 16  # wrong at position 5
    acc, per_pos = masked_accuracy(model, x, y, batch_size=3, per_position=True)
    assert acc == 0.5
    assert per_pos[2] == 1.0 and per_pos[5] == 0.0 and bool(per_pos[0].isnan())


def test_train_config_validation():
    for kw, name in [(dict(lr=0), "lr"), (dict(batch_size=0), "batch_size"),
                     (dict(schedule="linear"), "schedule"), (dict(time_budget=-1), "time_budget"),
                     (dict(stop_accuracy=1.5), "stop_accuracy"), (dict(max_steps=0), "max_steps")]:
        with pytest.raises(ValueError, match=name):
            TrainConfig(**kw)


def test_delta_net_learns_tiny_mqar(one_thread):
    """vocab 64, 32 tokens, 4 pairs: DeltaNet reaches >= 90% held-out accuracy in ~300 steps."""
    xtr, ytr = make_mqar(12_000, 32, 4, 64, seed=0)
    xte, yte = make_mqar(500, 32, 4, 64, seed=1)
    torch.manual_seed(0)
    model = build_model("delta_net", width=64, num_layers=2, vocab_size=64)
    cfg = TrainConfig(lr=3e-3, max_steps=300, epochs=10, batch_size=32, eval_every=50,
                      stop_accuracy=0.95, device="cpu")
    run = train_and_evaluate(model, (xtr, ytr), (xte, yte), cfg)
    assert run.best_accuracy >= 0.9, run.curve
    # the curve starts near chance (1/32 values) and is logged with steps and seconds
    assert run.curve[0]["step"] == 50 and run.curve[0]["accuracy"] < 0.5
    assert all(c["seconds"] > 0 for c in run.curve)
    assert run.curve[-1]["accuracy"] == run.final_accuracy
    assert masked_accuracy(model, xte, yte) == run.final_accuracy


def test_training_is_deterministic(one_thread):
    data = make_mqar(256, 32, 4, 64, seed=0)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("linear_attention", width=32, num_layers=1, vocab_size=64, head_dim=16)
        cfg = TrainConfig(lr=3e-3, max_steps=12, batch_size=16, eval_every=6, device="cpu")
        runs.append(train_and_evaluate(model, data, data, cfg))
    assert [c["loss"] for c in runs[0].curve] == [c["loss"] for c in runs[1].curve]
    assert runs[0].steps == 12 and runs[0].stopped_by == "steps"


def test_time_budget_stops_run(one_thread):
    data = make_mqar(256, 32, 4, 64, seed=0)
    torch.manual_seed(0)
    model = build_model("delta_net", width=32, num_layers=1, vocab_size=64, head_dim=16)
    cfg = TrainConfig(lr=1e-3, max_steps=10_000, epochs=1000, batch_size=16, eval_every=1000,
                      time_budget=0.5, device="cpu")
    run = train_and_evaluate(model, data, data, cfg)
    assert run.stopped_by == "time_budget" and run.steps < 10_000
    assert run.curve[-1]["step"] == run.steps


def test_cli_writes_table_json_plot(tmp_path, capsys, one_thread):
    out = tmp_path / "mqar"
    rc = cli_main([
        "--models", "delta_net", "hybrid-swa", "--widths", "16", "32", "--seq-len", "32",
        "--num-pairs", "4", "--vocab-size", "64", "--head-dim", "16", "--sliding-window", "8",
        "--lr", "1e-3", "3e-3", "--train-size", "64", "--test-size", "32", "--max-steps", "3",
        "--batch-size", "16", "--eval-every", "2", "--device", "cpu", "--no-progress",
        "--output", str(out),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| seq_len | pairs | model" in printed and "hybrid-swa" in printed
    data = json.loads((out / "results.json").read_text())
    assert len(data["results"]) == 2 * 2 * 2  # models x widths x lrs
    r = data["results"][0]
    assert {"model", "width", "lr", "best_accuracy", "steps_to_99", "seconds_to_99", "curve"} <= set(r)
    assert [c["step"] for c in r["curve"]] == [2, 3]
    assert (out / "accuracy_vs_width.png").stat().st_size > 1000
    assert (out / "learning_curves.png").stat().st_size > 1000


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--no-such-flag"])
    assert cli_main(["--seq-len", "16", "--num-pairs", "8", "--no-progress"]) == 2
    assert "seq_len must be >= 4" in capsys.readouterr().err
    assert cli_main(["--seq-len", "64", "128", "--num-pairs", "4", "8", "16"]) == 2


def test_gpu_script_smoke(tmp_path, monkeypatch):
    """benchmarks/gpu_mqar.py end to end on CPU: workers, queue, deadline, outputs."""
    import importlib
    from pathlib import Path

    # A plain import (not spec_from_file_location): spawned workers re-import the module by
    # name, and spawn hands them the parent's sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    mod = importlib.import_module("gpu_mqar")
    out = tmp_path / "smoke"
    rc = mod.main(["--smoke", "--widths", "16", "--head-dim", "16", "--lrs", "1e-3", "3e-3",
                   "--budget", "2", "--eval-every", "5", "--train-size", "256", "--test-size", "32",
                   "--workers", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert len(res) == 2 * 2  # models x lrs
    assert all(r["steps"] > 0 and r["curve"] and r["seconds"] <= 2 + 5 for r in res)
    assert {r["worker"] for r in res} <= {0, 1}
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    assert (out / "table.md").exists() and (out / "learning_curves.png").exists()
    assert not (out / "data.pt").exists()
    # every evaluation of every job is streamed to progress.jsonl (a killed run keeps curves)
    rows = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(r["curve"]) for r in res)
    assert {(r["model"], r["lr"]) for r in rows} == {(r["model"], r["lr"]) for r in res}
    # --cuda-graph is on by default and falls back on CPU, saying why
    assert all(r["step_mode"] == "eager (cuda_graph needs CUDA, device is cpu)" for r in res)


def test_gpu_script_lr_grid(monkeypatch, capsys):
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    mod = importlib.import_module("gpu_mqar")
    args = mod.parse_args(["--devices", "cpu"])
    assert args.lrs_for == {64: [1e-3, 3e-3], 128: [5e-4, 1.5e-3], 256: [3e-4, 1e-3], 512: [1.5e-4, 5e-4]}
    jobs = mod.job_grid(args.models, args.widths, args.lrs_for)
    assert len(jobs) == 5 * 4 * 2 and jobs[0] == ("delta_net", 512, 1.5e-4)
    assert [m for m, _, _ in jobs[:16]] == ["delta_net"] * 8 + ["linear_attention"] * 8
    assert mod.parse_args(["--devices", "cpu", "--lrs", "1e-3"]).lrs_for == {w: [1e-3] for w in (64, 128, 256, 512)}
    for bad in (["--lr-grid", "64:1e-3"], ["--lr-grid", "64:x"], ["--lr-grid", "64:-1 128:1 256:1 512:1"]):
        with pytest.raises(SystemExit):
            mod.parse_args(["--devices", "cpu", *bad])
    assert "no learning rates for widths [128, 256, 512]" in capsys.readouterr().err
