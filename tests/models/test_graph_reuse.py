"""Kept decode steps (``deltanet.models.decoding``): a generation of the same key reuses the
captured step of an earlier one, refilling its static cache in place, and gives what a fresh
decode gives.

On the CPU the captured step runs eagerly (``GRAPH_DEVICES`` widened), through the same static
cache, chooser and refill as on CUDA, so every bookkeeping path is compared here with the eager
reference loop (growing K/V, plain forwards)."""

import copy
import importlib
import pkgutil
import re

import pytest
import torch

import deltanet
from deltanet.models import cuda_graph, set_decode_kernel
from deltanet.models.cache import DeltaNetCache
from deltanet.models.decoding import KEPT_GRAPHS, clear_decode_graphs, decode
from deltanet.models.sampling import SamplingConfig
from tests.models.test_decoding import graph_on_cpu  # noqa: F401 (a fixture)
from tests.models.test_modeling import MIXES, VOCAB, make_model

ALL_MIXES = list(MIXES)


@pytest.fixture(autouse=True)
def _captured_step_on_cpu(graph_on_cpu):
    """Every test here: the captured step runs (eagerly) on CPU tensors too."""


def _prompt(seed: int, B: int = 2, S: int = 9, pad: int = 0):
    """``B`` rows of ``S`` tokens; the last row left-padded by ``pad`` positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[-1, :pad] = 0
    ids[-1, :pad] = 0
    return ids, mask


def _kept(model):
    return model.__dict__.get("_kept_decode_graphs", {})


@pytest.mark.parametrize("mix", ALL_MIXES)
def test_a_second_generation_reuses_the_step_and_equals_the_eager_loop(mix):
    """Same shapes, another prompt and another padding: the kept step replays on the refilled
    cache (no new DecodeGraph) and its tokens, greedy and sampled, are the eager loop's."""
    model = make_model(mix)
    built = []
    orig = cuda_graph.DecodeGraph.__init__

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        built.append(self)
    cuda_graph.DecodeGraph.__init__ = spy
    try:
        for cfg in (SamplingConfig(), SamplingConfig(temperature=1.2, top_k=12, top_p=0.9, seed=3)):
            built.clear()
            runs = []
            for seed, pad in ((1, 0), (2, 4), (3, 7)):  # the last rows wrap the window-5 rings
                ids, mask = _prompt(seed, pad=pad)
                got = decode(model, ids, mask, max_new_tokens=10, sampling=cfg)
                want = decode(model, ids, mask, max_new_tokens=10, sampling=cfg, cuda_graph=False)
                assert torch.equal(got.tokens, want.tokens), (mix, cfg, seed)
                runs.append(got)
            assert len(built) == 1, mix  # one step captured; the later generations replayed it
            assert [r.stats["graph_reused"] for r in runs] == [False, True, True]
            # each result keeps its own tokens (the kept chooser's buffer is overwritten next time)
            assert not torch.equal(runs[0].tokens, runs[1].tokens)
    finally:
        cuda_graph.DecodeGraph.__init__ = orig


@pytest.mark.parametrize("mix", ["delta", "swa_hybrid", "global_hybrid"])
def test_what_a_kept_step_serves(mix):
    """Recurrent states and sliding-window rings do not depend on the prompt length or the number
    of new tokens: one step serves them all (within its output buffer's capacity); a full-attention
    cache is sized prompt + new tokens, so only the same total reuses its step."""
    model = make_model(mix)
    full = mix == "global_hybrid"
    first = decode(model, *_prompt(1, S=9), max_new_tokens=8)
    assert not first.stats["graph_reused"]
    for S, n, same_total in ((6, 8, False), (8, 6, True), (12, 30, False)):
        ids, mask = _prompt(S, S=S)
        res = decode(model, ids, mask, max_new_tokens=n)
        assert torch.equal(res.tokens, decode(model, ids, mask, max_new_tokens=n, cuda_graph=False).tokens)
        assert res.stats["graph_reused"] is (same_total or not full), (S, n)
    assert len(_kept(model)) == (3 if full else 1)
    # a longer generation needs a larger output buffer: a new step
    assert not decode(model, *_prompt(4), max_new_tokens=65).stats["graph_reused"]


def test_the_key_holds_what_the_step_fixes():
    model = make_model("swa_hybrid")
    ids, mask = _prompt(1)

    def reused(**kw):
        return decode(model, ids, mask, max_new_tokens=6, **kw).stats["graph_reused"]

    assert not reused()
    assert reused()
    assert reused(sampling=SamplingConfig(seed=9))  # greedy: the seed is not part of the step
    assert not reused(sampling=SamplingConfig(temperature=1.0, seed=1))
    assert not reused(sampling=SamplingConfig(temperature=1.0, seed=2))  # the seed is a constant of the graph
    assert not reused(eos_token_id=5)
    assert not reused(pad_token_id=3)
    set_decode_kernel(model, "eager")
    assert not reused()  # another route through the layers
    with torch.no_grad():
        model.lm_head.weight.data = model.lm_head.weight.data.clone()  # another address
    assert not reused()
    assert not decode(model, ids[:1], mask[:1], max_new_tokens=6).stats["graph_reused"]  # another batch
    assert len(_kept(model)) == KEPT_GRAPHS  # the least recently used ones went


def test_switches_are_part_of_the_key(monkeypatch):
    from deltanet.ops import pdl

    model = make_model("delta")
    ids, mask = _prompt(1)
    decode(model, ids, mask, max_new_tokens=4)
    monkeypatch.setattr(pdl, "PDL_DECODE", True)
    assert not decode(model, ids, mask, max_new_tokens=4).stats["graph_reused"]


def test_opting_out_and_clearing():
    model = make_model("delta")
    ids, mask = _prompt(1)
    assert not decode(model, ids, mask, max_new_tokens=4, reuse_graph=False).stats["graph_reused"]
    assert len(_kept(model)) == 0
    model.reuse_decode_graphs = False
    decode(model, ids, mask, max_new_tokens=4)
    assert len(_kept(model)) == 0
    model.reuse_decode_graphs = True
    decode(model, ids, mask, max_new_tokens=4)
    twin = copy.deepcopy(model)  # the kept steps stay with the original
    assert len(_kept(twin)) == 0 and not decode(twin, ids, mask, max_new_tokens=4).stats["graph_reused"]
    assert clear_decode_graphs(model) == 1 and clear_decode_graphs(model) == 0
    assert not decode(model, ids, mask, max_new_tokens=4).stats["graph_reused"]


def test_an_early_stop_leaves_the_kept_step_usable():
    """A generation that stopped at EOS (counters, chooser and cache mid-way) is followed by a
    full one from the same kept step."""
    model = make_model("swa_hybrid")
    ids, mask = _prompt(5, B=1)
    free = decode(model, ids, mask, max_new_tokens=12, eos_token_id=None)
    eos = int(free.tokens[0, 2])
    stopped = decode(model, ids, mask, max_new_tokens=12, eos_token_id=eos, check_every=1)
    assert stopped.tokens.shape[1] == 3
    again = decode(model, ids, mask, max_new_tokens=12, eos_token_id=eos, check_every=1)
    assert again.stats["graph_reused"] and torch.equal(again.tokens, stopped.tokens)
    other_ids, other_mask = _prompt(6, B=1)
    want = decode(model, other_ids, other_mask, max_new_tokens=12, eos_token_id=eos, cuda_graph=False,
                  check_every=1)
    got = decode(model, other_ids, other_mask, max_new_tokens=12, eos_token_id=eos, check_every=1)
    assert got.stats["graph_reused"] and torch.equal(got.tokens, want.tokens)


def test_streaming_from_a_kept_step():
    """Streamed tokens of a generation that replays a kept step are its result, and the eager loop's."""
    model = make_model("all")
    cfg = SamplingConfig(temperature=1.0, seed=2)
    decode(model, *_prompt(1, pad=3), max_new_tokens=6, sampling=cfg)
    ids, mask = _prompt(2, pad=6)
    seen = []
    res = decode(model, ids, mask, max_new_tokens=6, sampling=cfg, on_tokens=seen.append)
    assert res.stats["graph_reused"] and torch.equal(torch.stack(seen, 1), res.tokens)
    assert torch.equal(res.tokens, decode(model, ids, mask, max_new_tokens=6, sampling=cfg, cuda_graph=False).tokens)


def test_refill_checks_before_it_writes():
    model = make_model("global_hybrid")
    ids, mask = _prompt(1)
    res = decode(model, ids, mask, max_new_tokens=4)
    static = res.cache
    before = [t.clone() for t in static.tensors()]
    with torch.no_grad():
        small = model(ids[:1], use_cache=True).cache  # another batch size
        longer = model(torch.randint(1, VOCAB, (2, 15)), use_cache=True).cache  # past the full-attention slots
    assert not static.refill(small) and not static.refill(longer)
    assert all(torch.equal(a, b) for a, b in zip(before, static.tensors()))
    assert not DeltaNetCache(model.config).refill(small)  # not a static cache
    with pytest.raises(ValueError, match="past_mask"):
        with torch.no_grad():
            static.refill(model(ids, use_cache=True).cache, torch.ones(2, 3))


def test_every_decode_switch_is_in_the_key():
    """Module-level switches that change a decode step (``*_BY_DEFAULT``, ``POISON``, ``PDL_*``,
    ``MEASURED``) are listed in ``cuda_graph.STEP_SWITCHES``: a new one must be added there, or a
    kept step would replay the old route after it is flipped."""
    pattern = re.compile(r"^(.*_BY_DEFAULT|POISON|PDL_.*|MEASURED)$")
    found = set()
    for info in pkgutil.walk_packages(deltanet.__path__, "deltanet."):
        if info.name.startswith(("deltanet.cli", "deltanet.bench", "deltanet.training", "deltanet.eval")):
            continue
        module = importlib.import_module(info.name)
        found |= {(info.name, name) for name in vars(module) if pattern.match(name)
                  and getattr(module, name).__class__ in (bool, dict)}
    assert found and found <= set(cuda_graph.STEP_SWITCHES), found - set(cuda_graph.STEP_SWITCHES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mix", ["delta", "swa_hybrid", "global_hybrid", "gated_swa_hybrid"])
def test_a_kept_cuda_graph_replays_on_the_refilled_cache(mix):
    """On the GPU (float32): the second generation replays the first one's captured graph (no eager
    step, no capture: no timings of them) on the refilled cache, and both give the eager loop's
    tokens; a kept graph's setup is its first replay."""
    model = make_model(mix, dtype=torch.float32).cuda()
    for layer in model.model.layers:
        if hasattr(layer.attn, "backend"):
            layer.attn.backend = "auto"
    clear_decode_graphs(model)
    runs = []
    for seed, pad in ((1, 0), (2, 4), (3, 7)):
        ids, mask = (t.cuda() for t in _prompt(seed, pad=pad))
        got = decode(model, ids, mask, max_new_tokens=12)
        want = decode(model, ids, mask, max_new_tokens=12, cuda_graph=False)
        assert torch.equal(got.tokens, want.tokens), (mix, seed)
        runs.append(got)
    assert [r.stats["graph_reused"] for r in runs] == [False, True, True]
    assert "capture_s" in runs[0].stats and all("capture_s" not in r.stats for r in runs[1:])
    assert all(0 < r.stats["setup_s"] < r.decode_s for r in runs)
