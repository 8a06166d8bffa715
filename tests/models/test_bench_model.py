"""``deltanet bench model --smoke``: the benchmark script runs end to end on CPU."""

import json

import pytest

from deltanet.cli.bench_model import cli_main


def test_train_benchmark_smoke(tmp_path):
    out = tmp_path / "train.md"
    assert cli_main(["model", "--smoke", "--models", "hybrid-swa-340m,fla-deltanet", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "train.json").read_text())["rows"]
    ours = [r for r in rows if r["model"] == "hybrid-swa-340m"]
    assert [r["T"] for r in ours] == [32, 64]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 and "error" not in r for r in ours)
    fla = [r for r in rows if r["model"] == "fla-deltanet"]
    assert len(fla) == 2 and all("error" in r or r["tokens_per_s"] > 0 for r in fla)  # fla is optional
    table = out.read_text()
    assert "| hybrid-swa-340m | 32 |" in table and "SMOKE RUN" in table


def test_benchmark_rejects_unknown_model():
    with pytest.raises(SystemExit):
        cli_main(["model", "--smoke", "--models", "gpt-5"])
    assert cli_main(["nonsense"]) == 2


def test_interleaved_benchmark_smoke(tmp_path):
    out = tmp_path / "ab.md"
    assert cli_main(["model", "--smoke", "--models", "deltanet-340m,transformer-340m", "--interleave", "3",
                     "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "ab.json").read_text())["rows"]
    assert [(r["model"], r["T"]) for r in rows] == [("deltanet-340m", 32), ("transformer-340m", 32),
                                                     ("deltanet-340m", 64), ("transformer-340m", 64)]
    for r in rows:
        assert "error" not in r and r["rounds"] == 3
        assert r["min_tokens_per_s"] <= r["tokens_per_s"] <= r["max_tokens_per_s"]
    assert [r["vs_first"] for r in rows if r["model"] == "deltanet-340m"] == [1.0, 1.0]
    assert "interleaved" in out.read_text()


def test_step_profile_groups_kernels(tmp_path):
    """``--profile``: per-step time by category and the top kernels (ops on CPU), in the JSON."""
    out = tmp_path / "prof.md"
    assert cli_main(["model", "--smoke", "--models", "transformer-340m", "--profile", "1", "--out", str(out)]) == 0
    row = json.loads((tmp_path / "prof.json").read_text())["rows"][0]
    prof = row["profile"]
    assert prof["total_us"] > 0 and prof["groups"]["matmul"] > 0
    assert abs(sum(prof["groups"].values()) - prof["total_us"]) <= len(prof["groups"])  # rounding only
    assert 0 < len(prof["top"]) <= 15 and prof["top"][0][1] >= prof["top"][-1][1]


def test_kernel_sweep_records_failures_and_skips_long_recurrent(tmp_path, monkeypatch, capsys):
    """``deltanet bench kernels``' loops (library functions since the parser moved to deltanet.cli):
    one failing method is a row with its error, recurrent methods stop at max_recurrent_T, every
    row is printed and appended to the JSON-lines file. The timing itself needs a GPU."""
    from deltanet.bench import kernels

    def fake_one(name, T, D, **kw):
        if name == "fla":
            raise ModuleNotFoundError("No module named 'fla'")
        return dict(method=name, D=D, T=T, fwd_ms=1.0, fwdbwd_ms=3.0, fwd_mtok_s=1.0, fwdbwd_mtok_s=0.5,
                    peak_gib=0.1, kw=kw)

    monkeypatch.setattr(kernels, "bench_one", fake_one)
    out = tmp_path / "rows.jsonl"
    rows = kernels.run_sweep([64], [1024, 8192], ["ours", "fla", "ours_recurrent"], tokens=4096, heads=2,
                             max_recurrent_T=4096, json_path=str(out))
    assert [(r["method"], r["T"]) for r in rows] == [("ours", 1024), ("fla", 1024), ("ours_recurrent", 1024),
                                                    ("ours", 8192), ("fla", 8192)]
    assert rows[1]["error"].startswith("ModuleNotFoundError") and rows[0]["kw"]["tokens"] == 4096
    assert [json.loads(x) for x in out.read_text().splitlines()] == rows
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert "| 64 | 1024 | 1.0 / 0.5 | ModuleNotFoundError:" in kernels.format_table(rows)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        kernels.run_sweep([64], [1024], ["nope"])

    monkeypatch.setattr(kernels, "bench_decode_step", lambda m, B, D, **kw: dict(
        method=m, kind="decode_step", B=B, D=D, step_us=10.0, tokens_per_s=B * 1e5, state_GBps=1.0))
    rows = kernels.run_decode_steps([64], [1, 8], ["ours", "ours_recurrent"])
    assert [(r["method"], r["B"]) for r in rows] == [("ours_recurrent", 1), ("ours_recurrent", 8)]
    assert kernels.format_decode_table(rows).splitlines()[2] == "| 64 | 1 | ours_recurrent | 10.0 | 100000 | 1 |"


def test_train_benchmark_regimes(tmp_path):
    """``--regimes bf16,autocast --untied``: one row per regime; bf16 parameters really train in bf16."""
    out = tmp_path / "reg.md"
    assert cli_main(["model", "--smoke", "--models", "deltanet-340m", "--regimes", "bf16,autocast",
                     "--untied", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "reg.json").read_text())["rows"]
    assert [(r["regime"], r["T"]) for r in rows] == [("bf16", 32), ("autocast", 32), ("bf16", 64), ("autocast", 64)]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)
    untied = 2 * 256 * 64 / 1e6  # embedding + lm_head of the smoke shape
    assert rows[0]["params_M"] == rows[1]["params_M"] >= untied
    with pytest.raises(SystemExit):
        cli_main(["model", "--smoke", "--regimes", "fp8"])


def test_plain_loss_flag_takes_the_plain_path(tmp_path, monkeypatch):
    """``bench model`` measures the fused loss unless ``--plain-loss`` asks for the logits; either
    way the same weights and batches give the same loss."""
    import deltanet.models.modeling as modeling

    calls = []
    fused = modeling.fused_linear_cross_entropy
    monkeypatch.setattr(modeling, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    rows = {}
    for flags in ([], ["--plain-loss"]):
        calls.clear()
        out = tmp_path / f"loss{len(flags)}.md"
        assert cli_main(["model", "--smoke", "--models", "deltanet-340m", *flags, "--out", str(out)]) == 0
        rows[bool(flags)] = json.loads(out.with_suffix(".json").read_text())["rows"]
        assert (len(calls) > 0) != bool(flags)
    assert {r["loss_impl"] for r in rows[False]} == {"fused linear CE"}
    assert {r["loss_impl"] for r in rows[True]} == {"plain"}
    assert [r["loss"] for r in rows[False]] == pytest.approx([r["loss"] for r in rows[True]], abs=2e-3)
