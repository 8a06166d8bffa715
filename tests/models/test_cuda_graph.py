"""CUDA-graph decoding (deltanet/models/cuda_graph.py).

On CPU the graph path's static-buffer step runs eagerly (``GRAPH_DEVICES`` widened to "cpu"):
that checks the bookkeeping — states updated in place and kept in the cache, the new token's
padding mask, rebuilding when a state tensor is swapped, which models take the path — against
the plain eager forward. The capture itself is checked on CUDA."""

import pytest
import torch

from deltanet.models import cuda_graph
from tests.models.test_modeling import VOCAB, make_model
from tests.utils import assert_close

RECURRENT_MIXES = ["delta", "linear", "gated", "gated_product"]


@pytest.fixture
def graph_on_cpu(monkeypatch):
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda", "cpu"))


def _generate(model, prompt, graph: bool, **kw):
    model.cuda_graph_decoding = graph
    return model.generate(prompt, do_sample=False, return_dict_in_generate=True, output_scores=True, **kw)


def _states(cache):
    return [t for layer in cache.layers for v in layer.values() for t in (v if isinstance(v, tuple) else (v,))]


@pytest.mark.parametrize("mix", RECURRENT_MIXES)
def test_graph_path_generates_what_eager_decoding_does(graph_on_cpu, mix):
    model = make_model(mix)
    prompt = torch.randint(1, VOCAB, (3, 7))
    eager = _generate(model, prompt, False, max_new_tokens=9)
    graph = _generate(model, prompt, True, max_new_tokens=9)
    assert torch.equal(graph.sequences, eager.sequences)
    assert_close(mix, torch.stack(graph.scores), torch.stack(eager.scores))
    assert getattr(graph.past_key_values, "_decode_graph", None) is not None  # the path was taken
    assert getattr(eager.past_key_values, "_decode_graph", None) is None
    for a, b in zip(_states(graph.past_key_values), _states(eager.past_key_values)):
        assert_close(f"{mix} state", a, b)


def test_graph_steps_update_the_cache_in_place(graph_on_cpu):
    model = make_model("delta", use_output_gate=True)
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = model(ids[:, :5], use_cache=True).past_key_values
        tensors = None
        for t in range(5, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache)
            assert_close(f"step {t}", out.logits, full[:, t:t + 1])
            if tensors is None:
                tensors = [id(x) for x in _states(cache)]
            assert [id(x) for x in _states(cache)] == tensors  # the same tensors, updated in place
            assert cache.get_seq_length() == t + 1
    assert cache._decode_graph.steps == 7


def test_padded_new_token_leaves_the_state_alone(graph_on_cpu):
    """A decode step whose token is padding (mask 0) writes nothing into the recurrent state, on
    the graph path as in the eager forward."""
    model = make_model("delta")
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, -1] = 0  # row 1's new token is padding
    outs = {}
    for graph in (False, True):
        model.cuda_graph_decoding = graph
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
            model(ids[:, -1:], past_key_values=cache)  # a first decode step (the graph path's warm-up)
            before = [layer["recurrent"].clone() for layer in cache.layers]
            logits = model(ids[:, :1], attention_mask=mask, past_key_values=cache).logits
        for layer, old in zip(cache.layers, before):
            assert torch.equal(layer["recurrent"][1], old[1])  # padding: untouched
            assert not torch.equal(layer["recurrent"][0], old[0])  # a real token: written
        outs[graph] = (logits, [x.clone() for x in _states(cache)])
    assert_close("padded step logits", outs[True][0], outs[False][0])
    for a, b in zip(outs[True][1], outs[False][1]):
        assert_close("padded step state", a, b)


@pytest.mark.parametrize("mix", RECURRENT_MIXES)
def test_left_padded_graph_generation_equals_single_sequences(graph_on_cpu, mix):
    model = make_model(mix)
    a, b = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [5]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=7, do_sample=False)
    assert torch.equal(out[0, 9:], model.generate(a, max_new_tokens=7, do_sample=False)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, max_new_tokens=7, do_sample=False)[0, 4:])


def test_beam_search_rebuilds_after_reordering(graph_on_cpu):
    """reorder_cache swaps every state tensor: the graph notices and rebuilds instead of reading
    stale buffers."""
    model = make_model("delta")
    prompt = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("mix", ["swa_hybrid", "global_hybrid", "all"])
def test_models_with_attention_decode_eagerly(graph_on_cpu, mix):
    model = make_model(mix)
    out = _generate(model, torch.randint(1, VOCAB, (2, 6)), True, max_new_tokens=4)
    assert getattr(out.past_key_values, "_decode_graph", None) is None


def test_bad_decode_inputs_still_raise(graph_on_cpu):
    model = make_model("delta")
    ids = torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids[:, :1], attention_mask=torch.ones(2, 3, dtype=torch.long), past_key_values=cache)
        with pytest.raises(ValueError):
            model(ids[:1, :1], past_key_values=cache)  # batch 1 against a batch-2 state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_graph_matches_eager_decoding_on_cuda(dtype):
    model = make_model("delta", dtype=dtype).cuda()
    model.config.delta_backend = "auto"
    for layer in model.model.layers:
        layer.attn.backend = "auto"
    prompt = torch.randint(1, VOCAB, (4, 33), device="cuda")
    eager = _generate(model, prompt, False, max_new_tokens=24)
    graph = _generate(model, prompt, True, max_new_tokens=24)
    g = graph.past_key_values._decode_graph
    assert g.graph is not None and g.steps == 23  # the first decode step is the prefill's output
    assert torch.equal(graph.sequences, eager.sequences)
    assert_close("scores", torch.stack(graph.scores).float(), torch.stack(eager.scores).float())
