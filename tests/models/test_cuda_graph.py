"""CUDA-graph decoding (deltanet/models/cuda_graph.py) for every layer mix.

On CPU the graph path's step function (``DecodeGraph._step``, the function CUDA captures) runs
eagerly (``GRAPH_DEVICES`` widened to "cpu"): against the plain eager forward (growing K/V) that
checks the static cache (ring buffers for sliding layers across wrap-around, preallocated K/V for
full attention, growth when full), RoPE positions and padding from the device counters, states
updated in place, beam search, and which calls take the path. The capture itself is checked on
CUDA (last test)."""

import pytest
import torch

from deltanet.models import cache as cache_mod
from deltanet.models import cuda_graph
from deltanet.models.cache import KVCache, RecurrentState, StaticKVCache
from tests.models.test_modeling import MIXES, VOCAB, make_model
from tests.utils import assert_close

ALL_MIXES = list(MIXES)  # recurrent only, SWA / global hybrids, Transformer++, every type at once


@pytest.fixture
def graph_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))


def _generate(model, prompt, graph: bool, **kw):
    model.cuda_graph_decoding = graph
    return model.generate(prompt, do_sample=False, return_dict_in_generate=True, output_scores=True, **kw)


def _entries(cache):
    """Comparable per-layer tensors: recurrent + conv states, and K/V in position order."""
    cache.make_dynamic()
    return [t for entry in cache.layers for t in entry.tensors()]


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_graph_path_generates_what_eager_decoding_does(graph_on_cpu, mix):
    """Prompt 7 + 9 new tokens > window 5: every sliding layer's ring wraps around three times."""
    model = make_model(mix)
    prompt = torch.randint(1, VOCAB, (3, 7))
    eager = _generate(model, prompt, False, max_new_tokens=9)
    graph = _generate(model, prompt, True, max_new_tokens=9)
    assert torch.equal(graph.sequences, eager.sequences)
    assert_close(mix, torch.stack(graph.scores), torch.stack(eager.scores))
    cache = graph.past_key_values
    assert cache._decode_graph.steps == 8  # the path was taken, one graph for the whole generation
    assert getattr(eager.past_key_values, "_decode_graph", None) is None
    for kind, entry in zip(MIXES[mix], cache.layers):
        assert isinstance(entry, RecurrentState if kind not in ("sliding_attention", "full_attention")
                          else StaticKVCache)
        if kind == "sliding_attention":
            assert entry.capacity == 5  # a ring of the window, never more
    for a, b in zip(_entries(cache), _entries(eager.past_key_values)):
        assert_close(f"{mix} state", a, b)


@pytest.mark.parametrize("mix", ["all", "swa_hybrid"])
def test_graph_steps_update_the_cache_in_place(graph_on_cpu, mix):
    model = make_model(mix, use_output_gate=True)
    ids = torch.randint(1, VOCAB, (2, 16))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :5], use_cache=True).past_key_values
        tensors = None
        for t in range(5, 16):
            out = model(ids[:, t:t + 1], past_key_values=cache)
            assert_close(f"step {t}", out.logits, full[:, t:t + 1])
            if tensors is None:
                tensors = [id(x) for x in cache.tensors()]
            assert [id(x) for x in cache.tensors()] == tensors  # the same tensors, updated in place
            assert cache.get_seq_length() == t + 1 == int(cache.counters.next)
    assert cache._decode_graph.steps == 11


def test_full_attention_cache_grows_when_full(graph_on_cpu, monkeypatch):
    """With a reserve of 2 slots the preallocated K/V fills up twice: it grows (new tensors, a new
    graph) and decoding goes on exactly as eager."""
    monkeypatch.setattr(cache_mod, "DEFAULT_RESERVE", 2)
    model = make_model("global_hybrid")
    prompt = torch.randint(1, VOCAB, (2, 6))
    eager = _generate(model, prompt, False, max_new_tokens=10)
    graph = _generate(model, prompt, True, max_new_tokens=10)
    assert torch.equal(graph.sequences, eager.sequences)
    assert_close("scores", torch.stack(graph.scores), torch.stack(eager.scores))
    full = graph.past_key_values.layers[1]
    assert isinstance(full, StaticKVCache) and full.capacity >= 15
    assert graph.past_key_values._decode_graph.steps < 9  # rebuilt after a growth


def test_padded_new_token_leaves_the_state_alone(graph_on_cpu):
    """A decode step whose token is padding (mask 0) writes nothing into the recurrent state and
    leaves its key invisible to later tokens, on the graph path as in the eager forward."""
    model = make_model("all")
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, -2] = 0  # row 1's first new token is padding
    outs = {}
    for graph in (False, True):
        model.cuda_graph_decoding = graph
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            model(ids[:, -1:], attention_mask=mask[:, :7], past_key_values=cache)  # the graph path's warm-up
            before = [e.recurrent.clone() for e in cache.layers if isinstance(e, RecurrentState)]
            logits = [model(ids[:, :1], attention_mask=mask[:, :8], past_key_values=cache).logits]
            after = [e.recurrent for e in cache.layers if isinstance(e, RecurrentState)]
            for new, old in zip(after, before):
                assert torch.equal(new[1], old[1])  # padding: untouched
                assert not torch.equal(new[0], old[0])  # a real token: written
            logits.append(model(ids[:, 1:2], attention_mask=mask, past_key_values=cache).logits)
        outs[graph] = (torch.cat(logits, 1), _entries(cache))
    assert_close("padded step logits", outs[True][0], outs[False][0])
    for a, b in zip(outs[True][1], outs[False][1]):
        assert_close("padded step state", a, b)


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_left_padded_graph_generation_equals_single_sequences(graph_on_cpu, mix):
    """Row b has 5 padding tokens; 9 + 7 positions wrap the window-5 rings with padding inside."""
    model = make_model(mix)
    a, b = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [5]])).long()
    model.cuda_graph_decoding = True
    out = model.generate(batch, attention_mask=mask, max_new_tokens=7, do_sample=False,
                         return_dict_in_generate=True)
    assert out.past_key_values._decode_graph.steps == 6
    assert torch.equal(out.sequences[0, 9:], model.generate(a, max_new_tokens=7, do_sample=False)[0, 9:])
    assert torch.equal(out.sequences[1, 9:], model.generate(b, max_new_tokens=7, do_sample=False)[0, 4:])


@pytest.mark.parametrize("mix", ["delta", "all", "transformer"])
def test_beam_search_keeps_one_graph(graph_on_cpu, mix):
    """reorder_cache selects beams in place: the captured step stays valid (no rebuild per step),
    and the result equals beam search without a cache."""
    model = make_model(mix)
    prompt = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    model.cuda_graph_decoding = True
    out = model.generate(prompt, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, model.generate(prompt, use_cache=False, **kw))
    assert out.past_key_values._decode_graph.steps == 5


def test_eager_forward_after_graph_steps(graph_on_cpu):
    """A multi-token forward on a cache left static by graph decoding turns it back (K/V in
    position order) and continues exactly."""
    model = make_model("all")
    ids = torch.randint(1, VOCAB, (2, 17))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :6], use_cache=True).past_key_values
        for t in range(6, 12):
            model(ids[:, t:t + 1], past_key_values=cache)
        assert cache.is_static
        out = model(ids[:, 12:], past_key_values=cache).logits
    assert not cache.is_static and isinstance(cache.layers[1], KVCache)
    assert_close("after graph steps", out, full[:, 12:])


def test_bad_decode_inputs_still_raise(graph_on_cpu):
    model = make_model("all")
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids[:, :1], attention_mask=torch.ones(2, 3, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError):
            model(ids[:1, :1], past_key_values=cache)  # batch 1 against a batch-2 state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["delta", "swa_hybrid", "global_hybrid", "transformer", "all", "gated_swa_hybrid"])
def test_captured_graph_matches_eager_decoding_on_cuda(dtype, mix):
    model = make_model(mix, dtype=dtype).cuda()
    model.config.delta_backend = "auto"
    for layer in model.model.layers:
        if hasattr(layer.attn, "backend"):
            layer.attn.backend = "auto"
    prompt = torch.randint(1, VOCAB, (4, 33), device="cuda")
    eager = _generate(model, prompt, False, max_new_tokens=24)
    graph = _generate(model, prompt, True, max_new_tokens=24)
    g = graph.past_key_values._decode_graph
    assert g.graph is not None and g.steps == 23  # the first decode step is the prefill's output
    scores_g, scores_e = torch.stack(graph.scores).float(), torch.stack(eager.scores).float()
    if dtype == torch.float32:
        assert torch.equal(graph.sequences, eager.sequences)
        assert_close("scores", scores_g, scores_e, rtol=1e-4)
    else:  # bf16: the fused steps round differently from the eager ones (decode attention vs SDPA,
        # kernels vs op by op). Compare the first steps (scores[0] is the prefill's, scores[1] the eager
        # warm-up step's, scores[2] the first replay's) up to a row's first differing token, which
        # must be a near tie in the eager scores (the contexts differ after it).
        assert torch.equal(graph.sequences[:, :34], eager.sequences[:, :34])  # the prefill's token
        bound = 0.05 * scores_e[1:3].abs().max()
        new_g, new_e = graph.sequences[:, 33:36], eager.sequences[:, 33:36]
        for row in range(prompt.shape[0]):
            differ = (new_g[row] != new_e[row]).nonzero()
            last = int(differ[0]) if len(differ) else 3  # steps with the same context: 0 .. last
            assert (scores_g[1:last + 1, row] - scores_e[1:last + 1, row]).abs().max() < bound
            if last < 3:
                s = scores_e[last, row]
                gap = s[new_e[row, last]] - s[new_g[row, last]]
                assert 0 <= gap < bound, (row, last, float(gap), float(bound))
