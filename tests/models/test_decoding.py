"""The decode loop with the token choice inside the step (deltanet/models/decoding.py, sampling.py).

The captured loop runs eagerly on CPU (``GRAPH_DEVICES`` widened) and is compared with the eager
reference loop (growing K/V, plain forwards) and with Hugging Face's ``generate``."""

import pytest
import torch

from deltanet.models import cuda_graph
from deltanet.models.cache import StaticKVCache
from deltanet.models.decoding import decode
from deltanet.models.sampling import SamplingConfig, choose_tokens, filter_logits, seeded_uniform
from tests.models.test_modeling import MIXES, VOCAB, make_model

ALL_MIXES = list(MIXES)


@pytest.fixture
def graph_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))


def _padded_batch():
    """Row 0: 9 tokens; row 1: 5 padding + 4 tokens (9 + new tokens wraps the window-5 rings)."""
    torch.manual_seed(1)
    a, b = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 4))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [5]])).long()
    return ids, mask


# -- sampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 8, 0.6), (0.5, 0, 0.3)],
                         ids=["top_p", "top_k", "k_and_p", "cold_top_p"])
def test_filtered_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 50, dtype=torch.float64) * 3
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))
    expected = warpers(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    ours = filter_logits(logits, SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    assert 0 < torch.isfinite(ours).sum() < ours.numel()  # the case filters something
    keep = torch.isfinite(expected)
    torch.testing.assert_close(ours[keep], expected[keep])


def test_sampled_tokens_follow_the_filtered_distribution():
    """20,000 draws (rows of one call): token frequencies within 5 sigma of softmax(filtered)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).expand(20000, 6)
    for cfg in (SamplingConfig(temperature=0.8, seed=3), SamplingConfig(temperature=1.0, top_k=3, seed=4)):
        tokens = choose_tokens(logits, cfg, position=11)
        p = filter_logits(logits[:1], cfg).softmax(-1)[0].double()
        freq = torch.bincount(tokens, minlength=6).double() / tokens.numel()
        sigma = (p * (1 - p) / tokens.numel()).sqrt()
        assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (cfg, freq, p)
        assert (freq[p == 0] == 0).all()


def test_seeded_noise_is_a_function_of_seed_and_position():
    u = seeded_uniform(7, 3, 4, 1000)
    assert torch.equal(u, seeded_uniform(7, torch.tensor(3), 4, 1000))  # int or device counter alike
    assert not torch.equal(u, seeded_uniform(8, 3, 4, 1000))
    assert not torch.equal(u, seeded_uniform(7, 4, 4, 1000))
    assert not torch.equal(u[0], u[1])  # rows draw independently
    assert ((u > 0) & (u < 1)).all() and abs(u.mean().item() - 0.5) < 0.02


def test_bad_sampling_configs_raise():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(TypeError, match="seed"):
        SamplingConfig(seed=1.5)


# -- the decode loop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", ALL_MIXES)
def test_captured_greedy_loop_equals_hf_generate(graph_on_cpu, mix):
    model = make_model(mix)
    ids, mask = _padded_batch()
    hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)[:, 9:]
    for graph in (True, False):
        res = decode(model, ids, mask, max_new_tokens=8, cuda_graph=graph)
        assert res.graph == graph
        assert torch.equal(res.tokens, hf), (mix, graph)


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_captured_sampling_loop_equals_eager_loop(graph_on_cpu, mix):
    """Same seed -> the same sampled tokens from the captured step and from plain eager forwards."""
    model = make_model(mix)
    ids, mask = _padded_batch()
    cfg = SamplingConfig(temperature=1.5, top_k=20, top_p=0.95, seed=5)
    graph = decode(model, ids, mask, max_new_tokens=10, sampling=cfg, cuda_graph=True)
    eager = decode(model, ids, mask, max_new_tokens=10, sampling=cfg, cuda_graph=False)
    assert graph.graph and not eager.graph
    assert torch.equal(graph.tokens, eager.tokens)
    other = decode(model, ids, mask, max_new_tokens=10, sampling=SamplingConfig(temperature=1.5, seed=6))
    assert not torch.equal(other.tokens, eager.tokens)  # the seed matters (would fail if it were greedy)


def test_full_attention_is_preallocated_for_exactly_the_new_tokens(graph_on_cpu):
    model = make_model("global_hybrid")
    ids = torch.randint(1, VOCAB, (2, 7))
    captured = []
    orig = cuda_graph.DecodeGraph.__init__

    def spy(self, model, cache, *a, **kw):
        orig(self, model, cache, *a, **kw)
        captured.append(cache)
    cuda_graph.DecodeGraph.__init__ = spy
    try:
        decode(model, ids, max_new_tokens=12)
    finally:
        cuda_graph.DecodeGraph.__init__ = orig
    (cache,) = captured  # one graph for the whole generation: no growth
    full = cache.layers[1]
    assert isinstance(full, StaticKVCache) and full.capacity == 7 + 12
    assert cache.seen_tokens == 7 + 11  # the last token is chosen, never fed


def test_eos_pads_finished_rows_and_stops_like_hf(graph_on_cpu):
    model = make_model("swa_hybrid")
    ids = torch.randint(1, VOCAB, (3, 6))
    free = decode(model, ids, max_new_tokens=12).tokens
    eos = int(free[0, 2])  # row 0 ends at its third token
    hf = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 6:]
    res = decode(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0, check_every=1)
    assert torch.equal(res.tokens, hf[:, :res.tokens.shape[1]])
    assert (res.tokens[0, 3:] == 0).all()


def test_streamed_tokens_are_the_result(graph_on_cpu):
    model = make_model("all")
    ids, mask = _padded_batch()
    seen = []
    res = decode(model, ids, mask, max_new_tokens=6, sampling=SamplingConfig(temperature=1.0, seed=2),
                 on_tokens=seen.append)
    assert len(seen) == 6 and torch.equal(torch.stack(seen, 1), res.tokens)
    assert res.tokens_per_s > 0


def test_steady_rate_counts_the_replays_after_the_setup(graph_on_cpu):
    """``steady_tokens_per_s``: rows x (tokens - 3) over the decode time after ``setup_s``; none
    where no graph was captured (the CPU runs the step function eagerly)."""
    from deltanet.models.decoding import DecodeResult

    res = DecodeResult(tokens=torch.zeros(2, 10, dtype=torch.long), prefill_s=1.0, decode_s=1.5, graph=True,
                       stats=dict(setup_s=0.1))
    assert res.steady_tokens_per_s == pytest.approx(2 * 7 / 1.4)
    assert DecodeResult(tokens=torch.zeros(2, 3, dtype=torch.long), prefill_s=1.0, decode_s=1.5, graph=True,
                        stats=dict(setup_s=0.1)).steady_tokens_per_s is None
    out = decode(make_model("delta"), torch.randint(1, VOCAB, (2, 5)), max_new_tokens=6)
    assert out.graph and "setup_s" not in out.stats and out.steady_tokens_per_s is None


def test_bad_decode_calls_raise():
    model = make_model("delta")
    with pytest.raises(ValueError, match="max_new_tokens"):
        decode(model, torch.ones(1, 3, dtype=torch.long), max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids"):
        decode(model, torch.ones(3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        decode(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 4), max_new_tokens=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mix", ["delta", "swa_hybrid", "global_hybrid", "transformer", "all", "gated_swa_hybrid"])
def test_captured_loop_on_cuda_equals_eager_loop(mix):
    """float32 on the GPU: the captured loop (one replay per token, token choice inside) gives the
    eager loop's greedy and sampled tokens."""
    model = make_model(mix, dtype=torch.float32).cuda()
    for layer in model.model.layers:
        if hasattr(layer.attn, "backend"):
            layer.attn.backend = "auto"
    ids, mask = (t.cuda() for t in _padded_batch())
    for cfg in (SamplingConfig(), SamplingConfig(temperature=1.0, top_k=10, top_p=0.9, seed=1)):
        graph = decode(model, ids, mask, max_new_tokens=20, sampling=cfg, cuda_graph=True)
        eager = decode(model, ids, mask, max_new_tokens=20, sampling=cfg, cuda_graph=False)
        assert graph.graph and torch.equal(graph.tokens, eager.tokens), (mix, cfg)
        # the eager first step + capture + first replay, timed apart from the replays after it
        assert 0 < graph.stats["setup_s"] < graph.decode_s and graph.steady_tokens_per_s > 0
        # of it: the eager first step and the capture
        parts = graph.stats["first_step_s"] + graph.stats["capture_s"]
        assert 0 < graph.stats["first_step_s"] and 0 < graph.stats["capture_s"] and parts < graph.stats["setup_s"]
        assert "setup_s" not in eager.stats and eager.steady_tokens_per_s is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("empty_cache", [False, True])
def test_capture_keeps_the_allocator_cache(monkeypatch, empty_cache):
    """The decode graph's capture leaves the caching allocator's freed blocks cached (torch.cuda.graph
    returns them to the driver first); with ``EMPTY_CACHE_ON_CAPTURE`` it does as torch does. Same
    tokens either way."""
    from deltanet.models import cuda_graph as cg

    monkeypatch.setattr(cg, "EMPTY_CACHE_ON_CAPTURE", empty_cache)
    model = make_model("delta", dtype=torch.float32).cuda()
    ids, mask = (t.cuda() for t in _padded_batch())
    ref = decode(model, ids, mask, max_new_tokens=6, cuda_graph=False).tokens
    torch.cuda.synchronize()
    freed = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # 64 MiB, then back to the cache
    del freed
    reserved = torch.cuda.memory_reserved()
    out = decode(model, ids, mask, max_new_tokens=6, cuda_graph=True)
    assert out.graph and torch.equal(out.tokens, ref)
    if empty_cache:
        assert torch.cuda.memory_reserved() < reserved  # the 64 MiB block went back to the driver
    else:
        assert torch.cuda.memory_reserved() >= reserved  # the 64 MiB block stayed cached


def test_decode_reads_the_cache_without_deprecated_names(monkeypatch):
    """transformers 5.2x renamed outputs' ``past_key_values`` to ``cache`` and warns (once per
    process) on the old name; ``decode`` must read the new one (our outputs carry ``.cache`` on
    older transformers too), so the warning never reaches e.g. ``deltanet train``'s sample."""
    from transformers.utils import logging as hf_logging

    seen = []
    monkeypatch.setattr(hf_logging.get_logger("transformers.utils.generic"), "warning",
                        lambda msg, *a, **k: seen.append(str(msg)))
    hf_logging.warning_once.cache_clear()  # an earlier test in this process may have used up the "once"
    model = make_model("global_hybrid")
    decode(model, torch.randint(1, VOCAB, (1, 5)), max_new_tokens=3)
    assert not [m for m in seen if "deprecated" in m], seen
