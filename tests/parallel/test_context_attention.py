"""Context-parallel softmax attention (sliding-window and full) on 2 and 3 gloo processes,
float64, against the single-process computation.

Op: ``context_parallel_attention`` on each rank's segment (equal and unequal, odd segment
lengths; windows of 1, shorter than, equal to and longer than a segment, spanning several
earlier ranks, and full attention; grouped-query heads) equals the slice of
``causal_attention`` on the whole sequence, and the gradients of q, k and v equal the
single-process ones on every rank: a key's gradient collects the contributions of the queries of
every later rank that saw it, through the halo's backward.

Models: hybrid-swa and hybrid-global tiny models (delta, sliding-window / full attention layers,
RoPE with the segment's global positions) give the single-process logits, loss and the gradient
of every parameter."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from deltanet.models import DeltaNetForCausalLM, get_config
from deltanet.ops.attention import causal_attention
from deltanet.parallel import SegmentLayout, context_parallel_attention, exchange_kv_halo

from ._reference import assert_matches_reference, cp_targets, reference_step
from ._spawn import run_distributed

TOL = 1e-10


def _segment(x: torch.Tensor, lengths, rank: int, dim: int = 1) -> torch.Tensor:
    start = sum(lengths[:rank])
    return x.narrow(dim, start, lengths[rank])


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _op_case(rank: int, lengths, window, use_flex=None, H=4, Hkv=2, D=6, Dv=5, B=2, seed=0) -> None:
    T = sum(lengths)
    gen = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    q, k = torch.randn(B, T, H, D, generator=gen, **d), torch.randn(B, T, Hkv, D, generator=gen, **d)
    v, w = torch.randn(B, T, Hkv, Dv, generator=gen, **d), torch.randn(B, T, H, Dv, generator=gen, **d)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o = causal_attention(*full, window=window, use_flex=False)
    (o * w).sum().backward()

    grads = not use_flex  # FlexAttention has no backward on the CPU
    loc = [_segment(t, lengths, rank).clone().requires_grad_(grads) for t in (q, k, v)]
    o_r = context_parallel_attention(*loc, window=window, use_flex=use_flex)
    case = f"rank {rank}, lengths {lengths}, window {window}, flex {use_flex}"
    err = _rel(o_r.detach(), _segment(o.detach(), lengths, rank))
    assert err < TOL, f"{case}: o relative error {err:.2e}"
    if not grads:
        return
    (o_r * _segment(w, lengths, rank)).sum().backward()
    for name, a, b in zip("qkv", loc, full):
        err = _rel(a.grad, _segment(b.grad, lengths, rank))
        assert err < TOL, f"{case}: d{name} relative error {err:.2e}"


def _halo_rows(rank: int, R: int) -> None:
    """The halo is the run of positions just before the segment, over as many ranks as needed;
    its gradient lands on the rows the owners sent (several later ranks may add to one row)."""
    lengths = (3, 1, 2)[:R] if R == 3 else (3, 2)
    layout = SegmentLayout.gather(dist.group.WORLD, lengths[rank], 1, torch.device("cpu"))
    assert layout.lengths == lengths and layout.start == sum(lengths[:rank])
    pos = torch.arange(sum(lengths), dtype=torch.float64)
    mine = _segment(pos.view(1, -1, 1), lengths, rank).clone().requires_grad_()
    for window in (None, 1, 2, 4):
        h = exchange_kv_halo(mine, window, layout)
        width = layout.start if window is None else min(window - 1, layout.start)
        torch.testing.assert_close(h.view(-1), pos[layout.start - width:layout.start])
        mine.grad = None
        (h * (rank + 1)).sum().backward()  # weight of the receiving rank
        want = torch.zeros(sum(lengths), dtype=torch.float64)
        for r in range(R):  # rank r's halo covers [start_r - width_r, start_r)
            s_r = sum(lengths[:r])
            w_r = s_r if window is None else min(window - 1, s_r)
            want[s_r - w_r:s_r] += r + 1
        torch.testing.assert_close(mine.grad.view(-1), _segment(want.view(1, -1), lengths, rank).view(-1))


def _tiny(preset: str, window: int, n_layers: int) -> DeltaNetForCausalLM:
    torch.manual_seed(0)
    cfg = get_config(preset, vocab_size=64, hidden_size=32, num_hidden_layers=n_layers, num_heads=2,
                     intermediate_size=64, sliding_window=window, delta_backend="torch", num_kv_heads=1)
    return DeltaNetForCausalLM(cfg).double()


def _model_case(rank: int, preset: str, window: int, n_layers: int, lengths) -> None:
    B, T = 2, sum(lengths)
    model = _tiny(preset, window, n_layers)
    kinds = set(model.config.layer_types)
    assert ("sliding_attention" if "swa" in preset else "full_attention") in kinds and "delta_net" in kinds
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (B, T), generator=gen)
    labels = x.clone()
    labels[0, 3] = -100
    ref_logits, ref_loss, ref_grads = reference_step(model, x, labels)

    out = model(input_ids=_segment(x, lengths, rank), labels=_segment(cp_targets(labels), lengths, rank),
                context_parallel=dist.group.WORLD)
    case = f"{preset} window {window} lengths {lengths} rank {rank}"
    torch.testing.assert_close(out.logits, _segment(ref_logits, lengths, rank), rtol=1e-10, atol=1e-10,
                               msg=lambda m: f"{case}: logits: {m}")
    if window == 3:  # explicit position_ids are honoured: global ones agree with the default, local ones do not
        start, seg = sum(lengths[:rank]), _segment(x, lengths, rank)
        pos = torch.arange(start, start + lengths[rank])[None].expand(B, -1)
        with torch.no_grad():
            glob = model(input_ids=seg, position_ids=pos, context_parallel=dist.group.WORLD).logits
            local = model(input_ids=seg, position_ids=pos - start, context_parallel=dist.group.WORLD).logits
        torch.testing.assert_close(glob, out.logits.detach(), rtol=1e-12, atol=1e-12)
        if rank > 0:
            assert (local - out.logits.detach()).abs().max() > 1e-6
    assert_matches_reference(model, out.loss, ref_loss, ref_grads, case)


def _refusals(rank: int, R: int) -> None:
    x = torch.randint(0, 64, (1, 4))
    model = _tiny("hybrid-swa-125m", 3, 2)
    with pytest.raises(ValueError, match="cu_seqlens must end at T"):  # the whole row's boundaries, not the segment's
        model(input_ids=x, cu_seqlens=torch.tensor([0, 2, 4]), context_parallel=dist.group.WORLD)
    attn = model.model.layers[1].attn
    with pytest.raises(ValueError, match="local_documents"):  # a bare group cannot place the documents
        attn(torch.zeros(1, 4, 32, dtype=torch.float64), position_ids=torch.arange(4)[None],
             cu_seqlens=torch.tensor([0, 2, 4]), context_parallel=dist.group.WORLD)
    # ranks disagreeing on the batch size: a clear error on every rank, not a hang
    with pytest.raises(ValueError, match="batch size differs"):
        SegmentLayout.gather(dist.group.WORLD, 4, 1 + rank, torch.device("cpu"))


def _cases(rank: int, R: int) -> None:
    _halo_rows(rank, R)
    equal = (5,) * R  # odd segment lengths
    unequal = (5, 2, 4)[:R] if R == 3 else (3, 6)
    for lengths in (equal, unequal):
        for window in (1, 2, 3, 5, 8, 13, None):
            _op_case(rank, lengths, window)
    for window in (3, 8, None):  # the FlexAttention path (Tq < Tk block mask), eager forward on the CPU
        _op_case(rank, equal, window, use_flex=True)
    for window in (3, 9):  # shorter than a segment; longer, spanning earlier ranks
        _model_case(rank, "hybrid-swa-125m", window, 4, equal)
    _model_case(rank, "hybrid-swa-125m", 4, 2, unequal)
    _model_case(rank, "hybrid-global-125m", 4, 4, equal)
    _model_case(rank, "hybrid-global-125m", 4, 4, unequal)
    _refusals(rank, R)
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 3], ids=["cp2", "cp3"])
@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile:UserWarning")
def test_context_parallel_attention_exact(world_size):
    run_distributed(_cases, world_size)


def test_needs_process_group():
    q = torch.zeros(1, 4, 1, 3)
    with pytest.raises(ValueError, match="process group"):
        context_parallel_attention(q, q, q, window=2)


@pytest.mark.parametrize("window", [0, -1, 2.0, True], ids=str)
def test_bad_window(window):
    q = torch.zeros(1, 4, 1, 3)
    with pytest.raises(ValueError, match="window must be a positive int"):
        context_parallel_attention(q, q, q, window=window)
