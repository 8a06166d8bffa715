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

Packed documents (``cu_seqlens`` of the whole sequence, ``B == 1``): a document may start inside a
segment, exactly at its first position, or span several ranks. The local op runs over this
segment's documents (:meth:`~deltanet.ops.packing.PackedSequences.segment`), each from ``[I | 0]``;
only the segment's first document can continue one from an earlier rank, so only its tokens get
the ``S_r^T o^P_t`` term, and the summary is the LAST document's ``[P | H]`` with ``P`` set to 0
when that document starts inside the segment (or at its start): the state after such a segment
does not depend on the earlier ranks, and the scan restarts there.

Additive linear attention (``S_t = S_{t-1} + k_t v_t^T``) is the special case ``P = I`` (0 after a
document start) and ``o^P_t = scale q_t``: :func:`context_parallel_linear_attention` runs the
same exchange and fold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops import BACKENDS, delta_rule
from ..ops.packing import PackedSequences
from .halo import SegmentLayout, as_layout, group_rank

# The Triton kernels take value widths up to 256 (K + V for head dims of 128).
_MAX_COLUMNS = 256

__all__ = ["context_parallel_delta_rule", "context_parallel_linear_attention", "gather_segments", "split_segment"]


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


def _fold(summary, o_p, o_h, initial_state, K, R, rank, group, output_final_state, out_dtype, sdtype,
          carried: int | None = None):
    """Exchange the summaries, fold those of the earlier ranks into the incoming state and
    finish the local output: ``o = S_in^T o^P + o^H`` for the first ``carried`` tokens (None:
    all; packed documents: those of the document continuing from an earlier rank), ``o^H``
    after them. Returns ``(o, final_state or None)``.

    Runs in the state dtype even under autocast: in bf16 the scan over ranks would round the
    state once per rank, and the output correction would lose the state's precision."""
    with torch.autocast(o_h.device.type, enabled=False):
        return _fold_impl(summary, o_p, o_h, initial_state, K, R, rank, group, output_final_state,
                          out_dtype, sdtype, carried)


def _fold_impl(summary, o_p, o_h, initial_state, K, R, rank, group, output_final_state, out_dtype, sdtype,
               carried=None):
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
    n = o_h.shape[1] if carried is None else carried
    if s_in is None or n == 0:
        o = o_h
    else:
        # o_t = S_in^T o^P_t + o^H_t, in the state dtype (o^P is scale P_{<=t}^T q_t).
        o = (torch.einsum("bhkv,bthk->bthv", s_in, o_p[:, :n].to(sdtype)) + o_h[:, :n].to(sdtype)).to(out_dtype)
        if n < o_h.shape[1]:  # tokens of documents that start in this segment: their own state only
            o = torch.cat([o, o_h[:, n:].to(out_dtype)], dim=1)

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
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    group: dist.ProcessGroup | None = None,
    layout: SegmentLayout | None = None,
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
        cu_seqlens: packed documents (``B == 1``): the WHOLE sequence's boundaries
            ``[0, ..., sum of the segment lengths]``, the same on every rank; documents may span
            ranks and start anywhere. Not combined with ``initial_state`` / ``output_final_state``
            (pass None / False on every rank: a rank that raises leaves the others in a collective).
        group: the context-parallel process group.
        layout: instead of ``group`` (and ``cu_seqlens``): a :class:`SegmentLayout`, possibly with
            ``documents``, built once per forward.
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
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel_delta_rule needs an initialised torch.distributed process group")
    if not isinstance(q, torch.Tensor) or q.ndim != 4 or not isinstance(v, torch.Tensor) or v.ndim != 4:
        raise ValueError("q and v must be tensors of shape [B, T, H, K] and [B, T, H, V]")
    group, docs = _segment_documents(q, group, layout, cu_seqlens)
    return segment_delta_rule(q, k, v, beta, g=g, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, documents=docs, group=group, backend=backend)


def _segment_documents(q, group, layout, cu_seqlens):
    """``(group, this rank's documents or None)`` from the arguments of a public op."""
    if layout is None and cu_seqlens is None:
        return group, None
    B, T = q.shape[:2]
    layout = as_layout(layout if layout is not None else group, T, B, q.device, documents=cu_seqlens)
    return layout.group, layout.local_documents


def segment_delta_rule(q, k, v, beta, *, g=None, scale=None, initial_state=None, output_final_state=False,
                       documents: PackedSequences | None = None, group=None, backend: str = "auto"):
    """:func:`context_parallel_delta_rule` with this rank's documents already cut to its segment
    (``documents``: ``PackedSequences.segment`` of the whole sequence's, or None): what the model
    layers call with their ``SegmentLayout.local_documents`` (DeltaProduct: its interleaved view)."""
    R, rank = dist.get_world_size(group), dist.get_rank(group)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if scale is None:
        scale = K ** -0.5
    if initial_state is not None and rank == 0 and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(f"initial_state must have shape [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}")
    if documents is not None and (initial_state is not None or output_final_state):
        raise ValueError("context_parallel_delta_rule with packed documents (cu_seqlens) takes no initial_state "
                         "and returns no final_state (each document starts from zero; its state ends on "
                         "whichever rank holds its last token)")
    N = B if documents is None else documents.num_seqs  # sequences of the local op

    # The state dtype of the local op: float64 for float64 inputs, float32 otherwise.
    sdtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    # Values [0 | v] from the state [I | 0]: the state after the segment is [P_r | H_r].
    v_aug = torch.cat([v.new_zeros(B, T, H, K), v], dim=-1)
    eye = torch.eye(K, dtype=sdtype, device=v.device).expand(N, H, K, K)
    s0_aug = torch.cat([eye, eye.new_zeros(N, H, K, V)], dim=-1)
    kw = dict(g=g, scale=scale, output_final_state=True, cu_seqlens=documents, backend=backend)
    if K + V <= _MAX_COLUMNS:
        o_aug, summary = delta_rule(q, k, v_aug, beta, initial_state=s0_aug, **kw)
    else:  # value columns evolve independently: two calls ([0 | I] and [v | 0]) give the same
        parts = [delta_rule(q, k, v_aug[..., c], beta, initial_state=s0_aug[..., c], **kw)
                 for c in (slice(0, K), slice(K, K + V))]
        o_aug, summary = (torch.cat(t, dim=-1) for t in zip(*parts))
    o_p, o_h = o_aug[..., :K], o_aug[..., K:]  # [B, T, H, K], [B, T, H, V]
    summary = summary.to(sdtype)  # [N, H, K, K + V] = [P_r | H_r]
    summary, carried = _document_summary(summary, documents, K)

    o, final = _fold(summary, o_p, o_h, initial_state if rank == 0 else None, K, R, rank, group,
                     output_final_state, v.dtype, sdtype, carried)
    return o, final


def _document_summary(summary: torch.Tensor, documents: PackedSequences | None, K: int):
    """Packed documents: ``(the last document's [P | H], P zeroed when it starts in this segment;
    the number of leading tokens that continue a document from an earlier rank)``."""
    if documents is None:
        return summary, None
    summary = summary[-1:]  # [1, H, K, K + V]
    if documents.num_seqs > 1 or documents.lead == 0:  # the last document starts here: no incoming state
        summary = torch.cat([torch.zeros_like(summary[..., :K]), summary[..., K:]], dim=-1)
    return summary, (documents.offsets[1] if documents.lead > 0 else 0)


def context_parallel_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    group: dist.ProcessGroup | None = None,
    layout: SegmentLayout | None = None,
) -> torch.Tensor:
    """Additive linear attention (:func:`deltanet.layers.linear_attention.linear_attention`)
    over a sequence split across the ranks of ``group``, each rank passing its own segment.

    ``q, k: [B, T_r, H, K]``, ``v: [B, T_r, H, V]``; ``cu_seqlens``: packed documents, the whole
    sequence's boundaries (as in :func:`context_parallel_delta_rule`). Returns ``o [B, T_r, H, V]``,
    this rank's slice of the single-device output; every rank must backpropagate through it.

    The state is a sum, so a segment's summary is ``(P, H) = (I, sum of its k v^T)`` (``P = 0``
    after a document start) and the incoming state of rank ``r`` the sum over the earlier ranks
    of its document: one all-gather of ``[B, H, K, K + V]`` and the delta rule's fold.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("context_parallel_linear_attention needs an initialised torch.distributed process group")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T_r, H, D], got {getattr(x, 'shape', type(x))}")
    group, docs = _segment_documents(q, group, layout, cu_seqlens)
    return segment_linear_attention(q, k, v, scale=scale, documents=docs, group=group)


def segment_linear_attention(q, k, v, *, scale=None, documents: PackedSequences | None = None, group=None):
    """:func:`context_parallel_linear_attention` with this rank's documents already cut to its
    segment (the model layers' entry)."""
    from ..layers.linear_attention import linear_attention  # the layers import this module

    R, rank = dist.get_world_size(group), dist.get_rank(group)
    B, T, H, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    sdtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    o_h, finals = linear_attention(q, k, v, scale=scale, cu_seqlens=documents)  # finals [N, H, K, V]
    eye = torch.eye(K, dtype=sdtype, device=v.device).expand(finals.shape[0], H, K, K)
    summary, carried = _document_summary(torch.cat([eye, finals.to(sdtype)], dim=-1), documents, K)
    o_p = q.to(sdtype) * scale  # P_{<=t} = I: o^P_t = scale q_t
    o, _ = _fold(summary, o_p, o_h, None, K, R, rank, group, False, v.dtype, sdtype, carried)
    return o


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
