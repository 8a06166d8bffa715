"""``deltanet bench model|decode --smoke``: the benchmark script runs end to end on CPU."""

import json

import pytest

from deltanet.bench.model import cli_main


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


def test_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "decode.md"
    assert cli_main(["decode", "--smoke", "--models", "deltanet-340m", "--cuda-graph", "both", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2, 1, 2]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in rows)
    assert [r["cuda_graph"] for r in rows] == [False] * 4  # graphs are taken on CUDA only


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
