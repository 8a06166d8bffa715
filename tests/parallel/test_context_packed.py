"""Context parallelism over packed documents (``cu_seqlens``), for additive linear attention, and
with activation checkpointing: 2, 3 and 4 gloo processes, float64, against one process on the
whole sequence.

Document layouts over unequal, odd segment lengths, chosen to be hostile: a document spanning
every rank, boundaries exactly at the rank edges, a rank holding several documents (one-token
documents included), a document starting inside one rank and covering the whole next one, a
single document. Checked on every rank: its slice of the output and the gradients of its inputs
(which collect the contributions of every later rank of the same document through the exchanges,
and none across a boundary).

Ops: the plain and gated delta rule, softmax attention (full and sliding windows shorter and
longer than a segment), linear attention. Models: every layer type in one stack (delta rule,
gated DeltaProduct, sliding / full attention, linear attention), packed; logits, the group's
loss and every parameter's gradient. Activation checkpointing (``mixer`` and ``block``): the same
values and gradients, and every rank reran every exchange of the recomputed regions (counted)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from deltanet.layers.linear_attention import linear_attention
from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
from deltanet.ops import delta_rule
from deltanet.ops.attention import causal_attention
from deltanet.parallel import (SegmentLayout, context, context_parallel_attention, context_parallel_delta_rule,
                               context_parallel_linear_attention, halo)

from ._reference import assert_matches_reference, cp_targets, reference_step
from ._spawn import run_distributed

TOL = 1e-10

# world size -> (segment lengths, {name: the whole sequence's cu_seqlens})
LAYOUTS = {
    2: ((7, 4), {"span": [0, 3, 11], "edge": [0, 7, 11], "several": [0, 1, 2, 7, 9, 10, 11], "one": [0, 11]}),
    3: ((5, 4, 6), {"span3": [0, 2, 13, 15], "edges": [0, 5, 9, 15],
                    "several": [0, 1, 4, 5, 7, 8, 9, 10, 11, 15], "cover": [0, 7, 15], "one": [0, 15]}),
    4: ((3, 4, 3, 5), {"span4": [0, 1, 14, 15], "edges": [0, 3, 7, 10, 15], "several": [0, 2, 3, 5, 6, 8, 12, 15]}),
}


def _segment(x: torch.Tensor, lengths, rank: int, dim: int = 1) -> torch.Tensor:
    return x.narrow(dim, sum(lengths[:rank]), lengths[rank])


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _close(what: str, got, want) -> None:
    err = _rel(got, want)
    assert err < TOL, f"{what}: relative error {err:.2e}"


def _delta_case(rank: int, lengths, cu, gated: bool, backend: str = "torch", H=2, K=4, V=3) -> None:
    T = sum(lengths)
    gen = torch.Generator().manual_seed(len(cu) + gated)
    d = dict(dtype=torch.float64)
    x = {"q": torch.randn(1, T, H, K, generator=gen, **d),
         "k": F.normalize(torch.randn(1, T, H, K, generator=gen, **d), dim=-1),
         "v": torch.randn(1, T, H, V, generator=gen, **d),
         "beta": 2 * torch.rand(1, T, H, generator=gen, **d)}
    if gated:
        x["g"] = -0.5 * torch.rand(1, T, H, generator=gen, **d)
    w = torch.randn(1, T, H, V, generator=gen, **d)
    cu = torch.tensor(cu)
    full = {n: t.clone().requires_grad_() for n, t in x.items()}
    o, _ = delta_rule(full["q"], full["k"], full["v"], full["beta"], g=full.get("g"), cu_seqlens=cu,
                      backend="reference")
    (o * w).sum().backward()

    loc = {n: _segment(t, lengths, rank).clone().requires_grad_() for n, t in x.items()}
    o_r, s = context_parallel_delta_rule(loc["q"], loc["k"], loc["v"], loc["beta"], g=loc.get("g"),
                                         cu_seqlens=cu, backend=backend)
    assert s is None
    case = f"rank {rank}, documents {cu.tolist()}, gated {gated}, backend {backend}"
    _close(f"{case}: o", o_r.detach(), _segment(o.detach(), lengths, rank))
    (o_r * _segment(w, lengths, rank)).sum().backward()
    for n in x:
        _close(f"{case}: d{n}", loc[n].grad, _segment(full[n].grad, lengths, rank))


def _attention_case(rank: int, lengths, cu, window) -> None:
    T, H, Hkv, D = sum(lengths), 4, 2, 5
    gen = torch.Generator().manual_seed(7)
    d = dict(dtype=torch.float64)
    q, k = torch.randn(1, T, H, D, generator=gen, **d), torch.randn(1, T, Hkv, D, generator=gen, **d)
    v, w = torch.randn(1, T, Hkv, D, generator=gen, **d), torch.randn(1, T, H, D, generator=gen, **d)
    cu = torch.tensor(cu)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o = causal_attention(*full, window=window, cu_seqlens=cu, use_flex=False)
    (o * w).sum().backward()
    loc = [_segment(t, lengths, rank).clone().requires_grad_() for t in (q, k, v)]
    o_r = context_parallel_attention(*loc, window=window, cu_seqlens=cu)
    case = f"rank {rank}, documents {cu.tolist()}, window {window}"
    _close(f"{case}: o", o_r.detach(), _segment(o.detach(), lengths, rank))
    (o_r * _segment(w, lengths, rank)).sum().backward()
    for name, a, b in zip("qkv", loc, full):
        _close(f"{case}: d{name}", a.grad, _segment(b.grad, lengths, rank))


def _linear_case(rank: int, lengths, cu) -> None:
    T, H, K, V = sum(lengths), 2, 4, 3
    gen = torch.Generator().manual_seed(3)
    d = dict(dtype=torch.float64)
    x = [torch.randn(1, T, H, K, generator=gen, **d), F.normalize(torch.randn(1, T, H, K, generator=gen, **d), dim=-1),
         torch.randn(1, T, H, V, generator=gen, **d)]
    w = torch.randn(1, T, H, V, generator=gen, **d)
    cu = torch.tensor(cu) if cu is not None else None
    full = [t.clone().requires_grad_() for t in x]
    o, _ = linear_attention(*full, cu_seqlens=cu, chunk_size=2)  # chunks of 2: odd segments cut chunks
    (o * w).sum().backward()
    loc = [_segment(t, lengths, rank).clone().requires_grad_() for t in x]
    o_r = context_parallel_linear_attention(*loc, cu_seqlens=cu)
    case = f"linear attention, rank {rank}, documents {cu.tolist() if cu is not None else None}"
    _close(f"{case}: o", o_r.detach(), _segment(o.detach(), lengths, rank))
    (o_r * _segment(w, lengths, rank)).sum().backward()
    for name, a, b in zip("qkv", loc, full):
        _close(f"{case}: d{name}", a.grad, _segment(b.grad, lengths, rank))


ALL_TYPES = ["delta_net", "sliding_attention", "linear_attention", "gated_delta_product", "full_attention"]


def _model(layer_types, checkpointing="none", window=3):
    torch.manual_seed(0)
    cfg = DeltaNetConfig(vocab_size=64, hidden_size=32, num_hidden_layers=len(layer_types), num_heads=2,
                         intermediate_size=64, layer_types=layer_types, num_householder=2, num_kv_heads=1,
                         delta_backend="torch", sliding_window=window, activation_checkpointing=checkpointing)
    return DeltaNetForCausalLM(cfg).double()


class _Counter:
    """Counts the exchanges (halo sends/receives, summary all-gathers) this rank runs forward."""

    def __init__(self):
        self.n = 0
        self.saved = (halo._KVHalo.forward, context._AllGather.forward)

    def __enter__(self):
        kv, ag = self.saved

        def kv_fwd(ctx, *a):
            self.n += 1
            return kv(ctx, *a)

        def ag_fwd(ctx, *a):
            self.n += 1
            return ag(ctx, *a)

        halo._KVHalo.forward, context._AllGather.forward = staticmethod(kv_fwd), staticmethod(ag_fwd)
        return self

    def __exit__(self, *exc):
        halo._KVHalo.forward, context._AllGather.forward = (staticmethod(f) for f in self.saved)


def _model_case(rank: int, lengths, cu, checkpointing="none", layer_types=ALL_TYPES, window=3) -> int:
    """Returns how many exchanges this rank ran (forward, and the recomputation in backward)."""
    T = sum(lengths)
    model = _model(layer_types, checkpointing, window)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (1, T), generator=gen)
    labels = x.clone()
    labels[0, 4] = -100
    kw = {"cu_seqlens": torch.tensor(cu)} if cu is not None else {}
    ref_logits, ref_loss, ref_grads = reference_step(model.eval(), x, labels, **kw)  # never recomputes

    model.train()  # activation checkpointing runs in training only
    with _Counter() as count:
        out = model(input_ids=_segment(x, lengths, rank), labels=_segment(cp_targets(labels), lengths, rank),
                    context_parallel=dist.group.WORLD, **kw)
        case = f"{layer_types} documents {cu} checkpointing {checkpointing} rank {rank}"
        torch.testing.assert_close(out.logits, _segment(ref_logits, lengths, rank), rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{case}: logits: {m}")
        assert_matches_reference(model, out.loss, ref_loss, ref_grads, case)
    return count.n


def _leads(rank: int, R: int) -> None:
    """The halo stops at the start of the segment's first document: full attention receives only
    that document's earlier part, rows of earlier documents are never sent."""
    lengths, layouts = LAYOUTS[R]
    want = {2: {"span": (0, 4), "edge": (0, 0), "several": (0, 0), "one": (0, 7)},
            3: {"span3": (0, 3, 7), "edges": (0, 0, 0), "several": (0, 0, 0), "cover": (0, 5, 2), "one": (0, 5, 9)},
            4: {"span4": (0, 2, 6, 9), "edges": (0, 0, 0, 0), "several": (0, 0, 1, 2)}}[R]
    for name, cu in layouts.items():
        layout = SegmentLayout.gather(dist.group.WORLD, lengths[rank], 1, torch.device("cpu"), documents=torch.tensor(cu))
        assert layout.leads == want[name], (name, layout.leads)
        local = layout.local_documents
        assert local.lead == want[name][rank] and local.total_tokens == lengths[rank]
        start = layout.start
        assert local.positions.tolist() == layout.documents.positions[start:start + lengths[rank]].tolist()


def _refusals(rank: int, R: int) -> None:
    lengths, layouts = LAYOUTS[R]
    cu = torch.tensor(next(iter(layouts.values())))
    q = torch.zeros(1, lengths[rank], 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="takes no initial_state"):
        context_parallel_delta_rule(q, q, q, q[..., 0], cu_seqlens=cu, output_final_state=True)
    with pytest.raises(ValueError, match="must end at T"):  # the LOCAL boundaries are not the whole row's
        context_parallel_delta_rule(q, q, q, q[..., 0], cu_seqlens=torch.tensor([0, lengths[rank]]))
    # ranks disagreeing on the documents: a clear error on every rank, not mixed documents
    bad = torch.tensor([0, 1 + rank, sum(lengths)])
    with pytest.raises(ValueError, match="differs across the context-parallel ranks"):
        context_parallel_attention(q, q, q, cu_seqlens=bad)
    model = _model(["delta_net", "sliding_attention"])
    x = torch.randint(0, 64, (1, lengths[rank]))
    with pytest.raises(ValueError, match="local_documents of the SegmentLayout"):  # a layer: bare group + cu_seqlens
        model.model.layers[0].attn(torch.zeros(1, lengths[rank], 32, dtype=torch.float64),
                                   cu_seqlens=torch.tensor([0, lengths[rank]]), context_parallel=dist.group.WORLD)
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=x, attention_mask=torch.ones_like(x), context_parallel=dist.group.WORLD)


def _cases(rank: int, R: int) -> None:
    lengths, layouts = LAYOUTS[R]
    _leads(rank, R)
    for cu in layouts.values():
        for gated in (False, True):
            _delta_case(rank, lengths, cu, gated)
        for window in (None, 2, 5):  # 5: longer than some segments
            _attention_case(rank, lengths, cu, window)
        _linear_case(rank, lengths, cu)
    _linear_case(rank, lengths, None)
    cu = next(iter(layouts.values()))  # the document spanning every rank
    _delta_case(rank, lengths, cu, True, backend="reference")
    saved, context._MAX_COLUMNS = context._MAX_COLUMNS, 5  # K + V over the width limit: two local calls
    try:
        _delta_case(rank, lengths, cu, True)
    finally:
        context._MAX_COLUMNS = saved
    _refusals(rank, R)
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 3, 4], ids=["cp2", "cp3", "cp4"])
def test_packed_ops_exact(world_size):
    run_distributed(_cases, world_size)


def _model_cases(rank: int, R: int) -> None:
    lengths, layouts = LAYOUTS[R]
    for name in (("span", "several") if R == 2 else ("span3", "edges", "several")):
        _model_case(rank, lengths, layouts[name])


@pytest.mark.parametrize("world_size", [2, 3], ids=["cp2", "cp3"])
def test_packed_models_exact(world_size):
    run_distributed(_model_cases, world_size)


def _checkpointing_cases(rank: int, R: int) -> None:
    lengths, layouts = LAYOUTS[R]
    counts = {}
    for cu in (layouts["span"], None):  # packed, and one plain row
        for mode in ("none", "mixer", "block"):
            counts[mode] = _model_case(rank, lengths, cu, mode)
        # every recomputed region reran its exchanges once more in backward (mixer: the mixers
        # hold all of them), on every rank alike
        assert counts["mixer"] == counts["block"] == 2 * counts["none"] > 0, counts
        mine = torch.tensor([counts["none"], counts["mixer"], counts["block"]])
        every = [torch.empty_like(mine) for _ in range(R)]
        dist.all_gather(every, mine)
        assert all(torch.equal(c, mine) for c in every), every
    dist.barrier()


def test_activation_checkpointing_exact():
    run_distributed(_checkpointing_cases, 2)


def test_every_layer_type_runs_context_parallel():
    from deltanet.models.configuration import LAYER_TYPES
    from deltanet.models.modeling import CONTEXT_PARALLEL_TYPES

    assert set(CONTEXT_PARALLEL_TYPES) == set(LAYER_TYPES)
