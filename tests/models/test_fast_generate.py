"""``model.generate``'s greedy search through the captured decode loop (``decoding.generate_fast``)
against Hugging Face's own loop, and the options that fall back to that loop.

On the CPU the captured step runs eagerly (``GRAPH_DEVICES`` widened), through the same loop, so
the fast path's outputs, lengths and padding are compared here with Hugging Face's greedy search
over the same model (``fast_generate = False``)."""

import pytest
import torch
from transformers import LogitsProcessorList

from deltanet.models import cuda_graph, decoding
from deltanet.models.cache import DeltaNetCache
from tests.models.test_decoding import _padded_batch, graph_on_cpu  # noqa: F401 (a fixture)
from tests.models.test_modeling import MIXES, VOCAB, make_model

pytestmark = pytest.mark.fast_generate


@pytest.fixture(autouse=True)
def _captured_step_on_cpu(graph_on_cpu):
    """Every test here: the captured step runs (eagerly) on CPU tensors too."""


@pytest.fixture
def calls(monkeypatch):
    """How many times the captured loop ran."""
    seen = []
    orig = decoding.decode

    def spy(*a, **kw):
        seen.append(kw)
        return orig(*a, **kw)
    monkeypatch.setattr(decoding, "decode", spy)
    return seen


def _hf(model, *args, **kw):
    model.fast_generate = False
    try:
        return model.generate(*args, **kw)
    finally:
        model.fast_generate = True


@pytest.mark.parametrize("mix", list(MIXES))
def test_greedy_generate_takes_the_loop_and_equals_hugging_face(mix, calls):
    model = make_model(mix)
    ids, mask = _padded_batch()
    got = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert len(calls) == 1
    assert torch.equal(got, _hf(model, ids, attention_mask=mask, max_new_tokens=8, do_sample=False))
    assert len(calls) == 1  # Hugging Face's loop did not take it


def test_eos_stops_and_pads_where_hugging_face_does(calls):
    model = make_model("swa_hybrid")
    ids = torch.randint(1, VOCAB, (3, 6))
    free = model.generate(ids, max_new_tokens=12, do_sample=False)[:, 6:]
    for eos in (int(free[0, 2]), int(free[1, 0])):  # a row ends early; then (maybe) every row
        for pad in (0, None):  # None: Hugging Face pads with the EOS
            kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=pad)
            got, want = model.generate(ids, **kw), _hf(model, ids, **kw)
            assert got.shape == want.shape and torch.equal(got, want), (eos, pad)
    assert len(calls) == 5  # the first generate and the four with an EOS took the loop


def test_lengths_from_max_length_and_the_generation_config(calls):
    model = make_model("delta")
    ids = torch.randint(1, VOCAB, (2, 6))
    assert torch.equal(model.generate(ids, max_length=10), _hf(model, ids, max_length=10))
    model.generation_config.max_new_tokens = 3
    assert torch.equal(model.generate(ids), _hf(model, ids)) and model.generate(ids).shape == (2, 9)
    assert len(calls) == 3
    model.generation_config.max_new_tokens = None
    model.generate(ids)  # no length anywhere: transformers' default (version-dependent), its loop
    assert len(calls) == 3


def test_return_dict_carries_the_sequences_and_the_cache(calls):
    model = make_model("global_hybrid")
    ids, mask = _padded_batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True)
    ref = _hf(model, ids, attention_mask=mask, max_new_tokens=5, return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref.sequences) and len(calls) == 1
    assert isinstance(out.past_key_values, DeltaNetCache) and out.past_key_values.is_static


@pytest.mark.parametrize("case", ["sample", "beams", "scores", "processor", "min_new_tokens", "config", "no_mask",
                                  "graphs_off", "switched_off"])
def test_what_the_loop_does_not_cover_runs_hugging_face(case, calls):
    model = make_model("delta")
    ids = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=4, do_sample=False)
    if case == "sample":
        kw.update(do_sample=True, top_k=5)
    elif case == "beams":
        kw.update(num_beams=2)
    elif case == "scores":
        kw.update(return_dict_in_generate=True, output_scores=True)
    elif case == "processor":
        kw.update(logits_processor=LogitsProcessorList())
    elif case == "min_new_tokens":
        kw.update(min_new_tokens=3, eos_token_id=5)
    elif case == "config":
        model.generation_config.repetition_penalty = 1.3  # changes greedy search: Hugging Face applies it
    elif case == "no_mask":
        ids[1, :2] = 0  # pad tokens without a mask: Hugging Face infers one
        kw.update(pad_token_id=0)
    elif case == "graphs_off":
        model.cuda_graph_decoding = False
    else:
        model.fast_generate = False
    torch.manual_seed(0)
    out = model.generate(ids, **kw)
    assert calls == []
    assert (out.sequences if case == "scores" else out).shape[1] == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mix", ["delta", "swa_hybrid", "global_hybrid"])
def test_greedy_generate_on_cuda_equals_hugging_face(mix, calls, monkeypatch):
    """float32 on the GPU: generate's fast path (the captured loop) gives Hugging Face's greedy
    tokens from its own loop over the captured step."""
    monkeypatch.setattr(cuda_graph, "GRAPH_DEVICES", ("cuda",))
    model = make_model(mix, dtype=torch.float32).cuda()
    for layer in model.model.layers:
        if hasattr(layer.attn, "backend"):
            layer.attn.backend = "auto"
    ids, mask = (t.cuda() for t in _padded_batch())
    got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert len(calls) == 1
    assert torch.equal(got, _hf(model, ids, attention_mask=mask, max_new_tokens=16, do_sample=False))
