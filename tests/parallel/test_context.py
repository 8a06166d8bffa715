"""Context-parallel delta rule on 2 and 4 gloo processes vs the single-device float64 oracle.

Every rank builds the same full inputs (same seed), runs the oracle on the whole sequence, then
the context-parallel op on its own segment, and checks its slice of the output, the final state
(last rank) and the gradients of q, k, v, beta, g and the initial state (first rank) — the
gradients of the local inputs collect contributions from every later rank through the summary
exchange, so a wrong backward scan fails here."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from deltanet.ops import delta_rule
from deltanet.parallel import context, context_parallel_delta_rule, gather_segments, split_segment

from ._spawn import run_distributed

TOL = 1e-10


def _inputs(gated: bool, B=2, T=48, H=3, K=8, V=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = dict(dtype=torch.float64)
    x = {
        "q": torch.randn(B, T, H, K, generator=gen, **d),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen, **d), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen, **d),
        "beta": 2 * torch.rand(B, T, H, generator=gen, **d),  # (0, 2): negative eigenvalues too
        "g": -0.3 * torch.rand(B, T, H, generator=gen, **d) if gated else None,
        "s0": torch.randn(B, H, K, V, generator=gen, **d),
        "w_o": torch.randn(B, T, H, V, generator=gen, **d),  # loss weights
        "w_s": torch.randn(B, H, K, V, generator=gen, **d),
    }
    return x


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _check(name, a, b, rank):
    err = _rel(a, b)
    assert err < TOL, f"rank {rank}: {name} relative error {err:.3e}"


def _exactness(rank: int, R: int, gated: bool, with_s0: bool, backend: str) -> None:
    x = _inputs(gated)
    names = ["q", "k", "v", "beta"] + (["g"] if gated else [])
    full = {n: x[n].clone().requires_grad_() for n in names}
    s0 = x["s0"].clone().requires_grad_() if with_s0 else None
    o, S = delta_rule(full["q"], full["k"], full["v"], full["beta"], g=full.get("g"), initial_state=s0,
                      output_final_state=True, backend="reference")
    ((o * x["w_o"]).sum() + (S * x["w_s"]).sum()).backward()

    loc = {n: split_segment(x[n], dim=1).clone().requires_grad_() for n in names}
    s0_loc = x["s0"].clone().requires_grad_() if (with_s0 and rank == 0) else None
    o_r, S_r = context_parallel_delta_rule(loc["q"], loc["k"], loc["v"], loc["beta"], g=loc.get("g"),
                                           initial_state=s0_loc, output_final_state=True, backend=backend)
    loss = (o_r * split_segment(x["w_o"], dim=1)).sum()
    if rank == R - 1:
        loss = loss + (S_r * x["w_s"]).sum()
    else:
        assert S_r is None
    loss.backward()

    _check("o", o_r, split_segment(o.detach(), dim=1), rank)
    _check("o (gathered)", gather_segments(o_r.detach(), dim=1), o.detach(), rank)
    if rank == R - 1:
        _check("final state", S_r.detach(), S.detach(), rank)
    for n in names:
        _check(f"d{n}", loc[n].grad, split_segment(full[n].grad, dim=1), rank)
    if s0_loc is not None:
        _check("d initial_state", s0_loc.grad, s0.grad, rank)


def _bad_input(rank: int, R: int) -> None:
    with pytest.raises(ValueError, match="divisible by the context-parallel size"):
        split_segment(torch.zeros(1, 4 * R + 1, 2), dim=1)
    q = torch.zeros(1, 4, 1, 3)
    kw = dict(cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="cu_seqlens must end at T"):  # the whole sequence's boundaries
        context_parallel_delta_rule(q, q, q, torch.zeros(1, 4, 1), **kw)
    # Ranks disagreeing on the head count: a clear error on every rank, not a hang.
    H = 1 + rank
    with pytest.raises(ValueError, match="differ across the context-parallel ranks"):
        context_parallel_delta_rule(torch.zeros(1, 4, H, 3), torch.zeros(1, 4, H, 3), torch.zeros(1, 4, H, 2),
                                    torch.zeros(1, 4, H))


def _world_cases(rank: int, R: int) -> None:
    # One spawn per world size runs every case: process start-up dominates these tests.
    for gated in (False, True):
        for with_s0 in (False, True):
            _exactness(rank, R, gated, with_s0, backend="torch")
    _exactness(rank, R, True, True, backend="reference")
    # K + V above the Triton width limit: the summary pass splits into [0 | I] and [v | 0] calls
    saved, context._MAX_COLUMNS = context._MAX_COLUMNS, 10
    try:
        _exactness(rank, R, True, True, backend="torch")
    finally:
        context._MAX_COLUMNS = saved
    _bad_input(rank, R)
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 4], ids=["cp2", "cp4"])
def test_context_parallel_exact(world_size):
    run_distributed(_world_cases, world_size)


def test_needs_process_group():
    q = torch.zeros(1, 4, 1, 3)
    with pytest.raises(ValueError, match="process group"):
        context_parallel_delta_rule(q, q, q, torch.zeros(1, 4, 1))


def test_fold_ignores_autocast():
    """The fold (initial state into the first summary, output correction) stays in float32 under
    bf16 autocast; a bf16 fold would be ~1e-3 off."""
    from deltanet.parallel.context import _fold

    B, T, H, K, V = 1, 8, 2, 16, 8
    summary, s0 = torch.randn(B, H, K, K + V), torch.randn(B, H, K, V)
    o_p, o_h = torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    args = (summary, o_p, o_h, s0, K, 1, 0, None, True, torch.float32, torch.float32)
    want_o, want_s = _fold(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, s = _fold(*args)
    assert o.dtype == s.dtype == torch.float32
    torch.testing.assert_close(o, want_o, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, want_s, rtol=1e-6, atol=1e-6)
    from deltanet.parallel.context import _fold_impl

    with torch.autocast("cpu", dtype=torch.bfloat16):  # without the guard: a real failure
        o_bad, _ = _fold_impl(*args)
    assert (o_bad - want_o).abs().max() > 1e-3
