"""``deltanet bench decode --smoke``: the decoding benchmark runs end to end on CPU."""

import json

import pytest

from deltanet.bench.decode import cache_traffic, weight_bytes_per_step
from deltanet.cli.bench_decode import cli_main


def test_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "decode.md"
    assert cli_main(["decode", "--smoke", "--models", "deltanet-340m,hybrid-global-340m,fla-deltanet",
                     "--cuda-graph", "both", "--hbm-gbps", "0.001", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    ours = [r for r in rows if r["model"] != "fla-deltanet"]
    # per model: generate with graph on / off, then the loop; batch 1 and 2 each
    assert [(r["path"], r["batch"]) for r in ours[:6]] == [("generate", 1), ("generate", 2), ("generate", 1),
                                                          ("generate", 2), ("loop", 1), ("loop", 2)]
    for r in ours:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["cache_MiB"] > 0 and r["step_floor_ms"] > 0
        # the loop times its steps; generate's are its time less a separately timed prefill, which
        # a loaded CPU can make meaningless (then no decode figure rather than a wrong one)
        if r["path"] == "loop" or "decode_tokens_per_s" in r:
            assert r["decode_tokens_per_s"] > 0 and r["bw_floor_frac"] > 0
        assert r["cuda_graph"] is False  # graphs are taken on CUDA only
    fla = [r for r in rows if r["model"] == "fla-deltanet"]
    assert [r["path"] for r in fla] == ["generate", "generate"]  # no loop row for fla
    assert all("error" in r or r["tokens_per_s"] > 0 for r in fla)  # fla is optional
    assert "| deltanet-340m | loop |" in out.read_text()


def test_loop_rows_time_a_first_and_a_warm_generation(tmp_path, monkeypatch):
    """With the captured step taken (on CPU: run eagerly, the tests' widening), a loop row is a
    model's first generation of its shape and ``warm_*`` one more that replays the kept step."""
    from deltanet.models import cuda_graph

    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))
    out = tmp_path / "d.md"
    assert cli_main(["decode", "--smoke", "--models", "hybrid-swa-340m", "--paths", "loop", "--hbm-gbps", "0.001",
                     "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert len(rows) == 2
    for r in rows:
        assert "error" not in r and r["cuda_graph"] is True, r
        assert r["warm_tokens_per_s"] > 0 and r["warm_decode_tokens_per_s"] > 0
    assert "warm_decode_tokens_per_s" in out.read_text()


def test_decode_benchmark_budget_skips_points(tmp_path):
    out = tmp_path / "d.md"
    assert cli_main(["decode", "--smoke", "--models", "deltanet-340m", "--paths", "loop", "--budget-s", "0",
                     "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [r["error"] for r in rows] == ["skipped: --budget-s spent"] * 2


def test_bandwidth_floor_counts_weights_and_state():
    from deltanet.models import DeltaNetForCausalLM, get_config
    from deltanet.models.decoding import decode

    import torch

    cfg = get_config("tiny", vocab_size=64, layer_types=["delta_net", "full_attention", "delta_net", "sliding_attention"],
                     sliding_window=4, tie_word_embeddings=False)
    model = DeltaNetForCausalLM(cfg).eval()
    tied = DeltaNetForCausalLM(get_config("tiny", vocab_size=64, tie_word_embeddings=True))
    assert weight_bytes_per_step(tied) == sum(p.numel() * p.element_size() for p in tied.parameters())
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes_per_step(model) == total - emb.numel() * emb.element_size()
    cache = decode(model, torch.randint(0, 64, (2, 6)), max_new_tokens=3, cuda_graph=False).cache
    held, moved = cache_traffic(cache)
    rec = sum(t.numel() * t.element_size() for e in cache.layers[::2] for t in e.tensors())
    assert held > rec and moved == held + rec  # recurrent states read and written, K/V read
    # a static cache: only its valid slots count (the full-attention layer has spare slots)
    cache.make_static(reserve=5)
    held_s, moved_s = cache_traffic(cache)
    full, ring = cache.layers[1], cache.layers[3]
    n = cache.seen_tokens
    assert full.capacity == n + 5 and bool(full.valid[:, :n].all()) and not bool(full.valid[:, n:].any())
    assert bool(ring.valid.all())  # the window is full
    kv = lambda e: sum(t.numel() * t.element_size() for t in (e.k, e.v))  # noqa: E731
    flags = sum(e.valid.numel() * e.valid.element_size() for e in (full, ring))
    assert held_s == rec + kv(full) + kv(ring) + flags
    assert moved_s == 2 * rec + round(kv(full) * n / (n + 5)) + kv(ring) + flags


def test_bad_paths_rejected():
    with pytest.raises(SystemExit):
        cli_main(["decode", "--smoke", "--paths", "fast"])


def _profiler():
    """``benchmarks/profile_decode_step.py`` as a module (the benchmarks folder is no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_decode_step.py"
    spec = importlib.util.spec_from_file_location("profile_decode_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_step_profiler_smoke(tmp_path):
    """``benchmarks/profile_decode_step.py --smoke``: profiles one-token steps and attributes them."""
    mod = _profiler()
    out = tmp_path / "profile.md"
    assert mod.main(["--smoke", "--out", str(out), "--steps", "2", "--batch", "1", "--modes", "eager",
                     "--decode-kernels", "eager"]) == 0
    (row,) = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert "error" not in row, row
    assert row["wall_ms_per_step"] > 0 and row["kernels_per_step"] > 0 and row["kernel_ms_per_step"] > 0
    assert row["top"] and all(t["per_step"] > 0 for t in row["top"])
    assert "aten::mm" in {t["kernel"] for t in row["top"]}  # the projections are seen (CPU: aten ops)
    assert mod.family("sm90_xmma_gemm_bf16bf16_bf16f32") == "GEMM"
    assert mod.family("delta_rule_recurrent_fwd_kernel") == "Triton"
    # ATen's kernels carry "_kernel" in their names too (an H100 profile, 2026-12-06, counted them as Triton)
    aten = "void at::native::vectorized_elementwise_kernel<4, at::native::rsqrt_kernel_cuda(at::TensorIteratorBase&)"
    assert mod.family(aten) == "elementwise"
    assert mod.family("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(") == "copy"
    assert mod.family("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, MeanOps") == "reduction"
    assert "## deltanet-340m, batch 1, eager" in out.read_text()


def test_decode_step_profiler_fused_route_and_check(tmp_path):
    """``--decode-kernels fused --check``: the fused route's step (Triton interpreter on CPU) has fewer
    profiled ops than the eager one (the CPU profile counts nested aten ops too: the exact count per
    block is tests/models/test_fused_decode.py's), and its greedy tokens equal the eager route's."""
    mod = _profiler()
    out = tmp_path / "profile.md"
    assert mod.main(["--smoke", "--out", str(out), "--steps", "3", "--batch", "2", "--modes", "eager",
                     "--decode-kernels", "eager,fused", "--check"]) == 0
    eager, fused, check = json.loads((tmp_path / "profile.json").read_text())["rows"]
    assert (eager["decode_kernel"], fused["decode_kernel"], check["mode"]) == ("eager", "fused", "check")
    assert fused["kernels_per_step"] < eager["kernels_per_step"], (fused["kernels_per_step"], eager["kernels_per_step"])
    assert check["tokens_equal"] is True and check["first_mismatch"] is None and check["logit_diff_rel"] < 1e-4, check
    assert "Fused (captured) vs eager route" in out.read_text()


def test_decode_benchmark_compares_decode_kernels(tmp_path):
    """``--decode-kernel fused,eager``: a row per route (the fused kernel runs in the Triton
    interpreter on CPU), each labelled; an unknown route is a usage error."""
    out = tmp_path / "dk.md"
    assert cli_main(["decode", "--smoke", "--models", "gated-deltanet-340m", "--paths", "loop", "--batch", "1",
                     "--decode-kernel", "fused,eager", "--hbm-gbps", "0.001", "--out", str(out)]) == 0
    rows = json.loads((tmp_path / "dk.json").read_text())["rows"]
    assert [(r["decode_kernel"], r["batch"]) for r in rows] == [("fused", 1), ("fused", 2), ("eager", 1), ("eager", 2)]
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0
    assert "| gated-deltanet-340m | loop | False | fused |" in out.read_text()
    with pytest.raises(SystemExit):
        cli_main(["decode", "--smoke", "--decode-kernel", "fast"])
