"""Context parallelism for the (gated) delta rule: one long sequence split over ranks.

Rank ``r`` of a group of ``R`` holds the tokens ``[r T/R, (r+1) T/R)`` of every sequence. A
segment acts on the state entering it as an affine map (per batch row and head)

    S  ->  P_r S + H_r        P_r = prod_t exp(g_t) (I - b_t k_t k_t^T)   [K, K]
                              H_r = the segment's own final state from S = 0   [K, V]

so no rank needs another rank's tokens, only the ``R`` summaries ``(P_r, H_r)``: the state
entering rank ``r`` is the scan ``S_r = P_{r-1} (... (P_0 S_0 + H_0) ...) + H_{r-1}``. The
recurrence is linear in (state, values) column by column, so ONE call of the ordinary op gives
both the summary and everything the output needs: run it with the values ``[0 | v]`` (``K + V``
columns) from the initial state ``[I | 0]``. Its state after token t is ``[P_{<=t} | H_{<=t}]``
and its output is ``[scale P_{<=t}^T q_t | scale H_{<=t}^T q_t]``, hence the exact local output

    o_t = scale (P_{<=t} S_r + H_{<=t})^T q_t = S_r^T o^P_t + o^H_t.

Exchange: one all-gather of the ``[B, H, K, K + V]`` summaries (``R B H K (K + V)`` elements
received per rank, independent of the sequence length); each rank then folds the summaries
of the ranks before it (``R - 1`` small matmuls). Backward is plain autograd through the local
op (any backend) and the fold; the all-gather's backward all-reduces the gathered gradient, so
every rank's ``dP_r, dH_r`` collects the contributions of all later ranks. Everything is exact:
the result equals the single-device op up to floating-point rounding.

Not covered: packed sequences (``cu_seqlens``) crossing rank boundaries.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import BACKENDS, delta_rule
from .halo import group_rank

# The Triton kernels take value widths up to 256 (K + V for head dims of 128).
_MAX_COLUMNS = 256

__all__ = ["context_parallel_delta_rule", "gather_segments", "split_segment"]


class _AllGather(torch.autograd.Function):
    """``x -> stack([x_0, ..., x_{R-1}])`` on every rank, differentiable.

    Each rank's gathered copy is used by its own loss, so the gradient of ``x_r`` is the sum
    over ranks of their gradients of slot ``r``: an all-reduce of the gathered gradient (gloo
    has no reduce-scatter; the summaries are small)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


class _Tie(torch.autograd.Function):
    """``(x, y) -> x`` whose backward also sends a zero gradient to ``y``: puts the summary
    exchange in every rank's graph, so that every rank enters its backward all-reduce (the
    first rank's output does not depend on the gathered summaries, and a rank that skipped the
    collective would leave the others waiting forever)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx.y_meta = (y.shape, y.dtype, y.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.y_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _check_same_shape(x: torch.Tensor, group, what: str) -> None:
    """All ranks must send summaries of one shape, or the all-gather hangs or corrupts."""
    shape = torch.tensor(list(x.shape), dtype=torch.int64, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"{what} differ across the context-parallel ranks: {[tuple(s.tolist()) for s in shapes]}")


def _fold(summary, o_p, o_h, initial_state, K, R, rank, group, output_final_state, out_dtype, sdtype):
    """Exchange the summaries, fold those of the earlier ranks into the incoming state and
    finish the local output: ``o = S_in^T o^P + o^H``. Returns ``(o, final_state or None)``.

    Runs in the state dtype even under autocast: in bf16 the scan over ranks would round the
    state once per rank, and the output correction would lose the state's precision."""
    with torch.autocast(o_h.device.type, enabled=False):
        return _fold_impl(summary, o_p, o_h, initial_state, K, R, rank, group, output_final_state,
                          out_dtype, sdtype)


def _fold_impl(summary, o_p, o_h, initial_state, K, R, rank, group, output_final_state, out_dtype, sdtype):
    s_first = None
    if initial_state is not None:
        s_first = initial_state.to(sdtype)
        # Fold the global initial state into the first segment's offset: H_0 <- P_0 S_0 + H_0.
        summary = torch.cat([summary[..., :K], summary[..., :K] @ s_first + summary[..., K:]], dim=-1)

    if R == 1:
        gathered = summary[None]
    else:
        _check_same_shape(summary, group, "summary shapes [B, H, K, K + V]")
        gathered = _AllGather.apply(summary, group)  # [R, B, H, K, K + V]

    # The scan: the state entering this rank (rank 0: the initial state, or zero).
    s_in = s_first
    for r in range(rank):
        P, Hr = gathered[r][..., :K], gathered[r][..., K:]
        s_in = Hr if s_in is None else P @ s_in + Hr
    if s_in is None:
        o = o_h
    else:
        # o_t = S_in^T o^P_t + o^H_t, in the state dtype (o^P is scale P_{<=t}^T q_t).
        o = (torch.einsum("bhkv,bthk->bthv", s_in, o_p.to(sdtype)) + o_h.to(sdtype)).to(out_dtype)

    if R > 1 and torch.is_grad_enabled() and gathered.requires_grad:
        o = _Tie.apply(o, gathered)

    final = None
    if output_final_state and rank == R - 1:
        P, Hr = summary[..., :K], summary[..., K:]
        final = Hr if s_in is None else P @ s_in + Hr
    return o, final


def context_parallel_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    g: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (gated) delta rule of :func:`deltanet.ops.delta_rule` over a sequence split across
    the ranks of ``group`` (default: the whole world), each rank passing its own segment.

    Args:
        q, k, v, beta, g, scale: this rank's segment, layouts as in ``delta_rule``
            (``[B, T_r, H, K]`` …). Rank ``r`` holds the ``r``-th consecutive segment; all
            ranks must agree on ``B, H, K, V`` (segment lengths may differ).
        initial_state: the state before the whole sequence, ``[B, H, K, V]``; read on the
            first rank of the group only (the others may pass None).
        output_final_state: return the state after the whole sequence on the LAST rank of the
            group (the others return None).
        cu_seqlens: not supported (packed sequences crossing rank boundaries); must be None.
        group: the context-parallel process group.
        backend: the local op's backend (any of ``BACKENDS``; all are differentiable).

    Every rank must backpropagate through its ``o`` (the backward exchanges the summaries'
    gradients with a collective, as DDP does).

    Returns:
        ``(o, final_state)``: ``o [B, T_r, H, V]`` for this rank's tokens, equal to the matching
        slice of the single-device output; gradients of every input equal the single-device ones.

    Cost: one local op over ``K + V`` value columns (instead of ``V``), one all-gather of
    ``B H K (K + V)`` elements per rank, ``R - 1`` matmuls of ``[K, K] x [K, K + V]``.

    Example (under ``torchrun --nproc-per-node R``)::

        >>> q_r, k_r, v_r, b_r = (split_segment(x, dim=1) for x in (q, k, v, beta))
        >>> o_r, _ = context_parallel_delta_rule(q_r, k_r, v_r, b_r)
        >>> o = gather_segments(o_r, dim=1)            # == delta_rule(q, k, v, beta)[0]
    """
    if cu_seqlens is not None:
        raise ValueError(
            "cu_seqlens is not supported by context_parallel_delta_rule (packed sequences across "
            "rank boundaries); split each row, or run packed batches without context parallelism"
        )
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel_delta_rule needs an initialised torch.distributed process group")
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    if not isinstance(q, torch.Tensor) or q.ndim != 4 or not isinstance(v, torch.Tensor) or v.ndim != 4:
        raise ValueError("q and v must be tensors of shape [B, T, H, K] and [B, T, H, V]")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if initial_state is not None and rank == 0 and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}")

    # The state dtype of the local op: float64 for float64 inputs, float32 otherwise.
    sdtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    # Values [0 | v] from the state [I | 0]: the state after the segment is [P_r | H_r].
    v_aug = torch.cat([v.new_zeros(B, T, H, K), v], dim=-1)
    eye = torch.eye(K, dtype=sdtype, device=v.device).expand(B, H, K, K)
    s0_aug = torch.cat([eye, eye.new_zeros(B, H, K, V)], dim=-1)
    if K + V <= _MAX_COLUMNS:
        o_aug, summary = delta_rule(q, k, v_aug, beta, g=g, scale=scale, initial_state=s0_aug,
                                    output_final_state=True, backend=backend)
    else:  # value columns evolve independently: two calls ([0 | I] and [v | 0]) give the same
        parts = [delta_rule(q, k, v_aug[..., c], beta, g=g, scale=scale, initial_state=s0_aug[..., c],
                            output_final_state=True, backend=backend) for c in (slice(0, K), slice(K, K + V))]
        o_aug, summary = (torch.cat(t, dim=-1) for t in zip(*parts))
    o_p, o_h = o_aug[..., :K], o_aug[..., K:]  # [B, T, H, K], [B, T, H, V]
    summary = summary.to(sdtype)  # [B, H, K, K + V] = [P_r | H_r]

    o, final = _fold(summary, o_p, o_h, initial_state if rank == 0 else None, K, R, rank, group,
                     output_final_state, v.dtype, sdtype)
    return o, final


def split_segment(x: torch.Tensor, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """This rank's consecutive segment of ``x`` along ``dim``; the length must divide evenly."""
    R, rank = group_rank(group)
    T = x.shape[dim]
    if T % R:
        raise ValueError(f"sequence length {T} (dim {dim}) must be divisible by the context-parallel size {R}")
    return x.narrow(dim, rank * (T // R), T // R)


def gather_segments(x: torch.Tensor, dim: int = 1, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's segment along ``dim`` (the inverse of :func:`split_segment`;
    not differentiable: for checking and for collecting outputs)."""
    R, _ = group_rank(group)
    parts = [torch.empty_like(x) for _ in range(R)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
