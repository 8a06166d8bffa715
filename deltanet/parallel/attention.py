"""Context parallelism for softmax attention: causal full and sliding-window attention over a
sequence split across the ranks of a process group.

Rank ``r`` holds the positions ``[o_r, o_r + T_r)``. Its queries see the keys of
``[o_r - h_r, o_r + T_r)``, where the halo length is

    h_r = min(window - 1, o_r)      sliding window (each query sees ``window`` positions, itself included)
    h_r = o_r                       full causal attention

The halo's keys and values (of the key/value heads, before any grouped-query repeat; one
message per pair of ranks) come from the earlier ranks through
:func:`~deltanet.parallel.halo.exchange_kv_halo`, over several ranks when the window is longer
than a segment (full attention: every earlier rank, all of its rows); its backward returns
every key's and value's gradient to the owning rank.

The local attention runs on ``[halo | own]`` keys with the queries aligned to the LAST keys
(:func:`~deltanet.ops.attention.causal_attention`'s convention): query ``i`` sits at key index
``h_r + i``, so its causal and window masks (``j <= h_r + i``, ``h_r + i - j < window``) are
those of the single-device sequence shifted by ``o_r - h_r``. RoPE is applied before the
exchange with global positions, so the halo's keys carry their owners' rotations. Exact: values
and gradients equal the single-device attention's up to floating-point rounding.

Packed documents (``cu_seqlens`` of the whole sequence, or a layout with ``documents``): the halo
stops at the start of the document holding the segment's first position (``h_r <= lead_r``,
:mod:`deltanet.parallel.halo`), and the local attention masks keys of other documents with the
documents of ``[o_r - h_r, o_r + T_r)``; full attention then receives only the segment's first
document's earlier part, not the whole sequence before it.

Cost: rank ``r`` receives ``h_r`` positions of K/V and computes ``T_r x (h_r + T_r)`` scores. For a
window shorter than a segment that is one neighbour's tail; for full attention the last rank
receives ``(R - 1) / R`` of the sequence and does ``2R - 1`` times the first rank's score work (no
load balancing: a zig-zag assignment of segments would even it out, but would change the
segment layout every other layer relies on).

Not covered: key padding, caches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..ops.attention import causal_attention
from .halo import SegmentLayout, as_layout, exchange_kv_halo

__all__ = ["context_parallel_attention"]


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    group: dist.ProcessGroup | None = None,
    layout: SegmentLayout | None = None,
    use_flex: bool | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (``window=None``) or sliding-window softmax attention over a sequence split across
    the ranks of ``group``, each rank passing its own consecutive segment.

    Args:
        q: ``[B, T_r, H, D]``; k: ``[B, T_r, Hkv, D]``; v: ``[B, T_r, Hkv, Dv]`` — this rank's
            segment (rank ``r`` holds the ``r``-th; lengths may differ across ranks), RoPE already
            applied with the global positions.
        window: each query sees at most the ``window`` most recent positions, itself included.
        scale: softmax scale, default ``D ** -0.5``.
        group: the context-parallel process group (default: the world); ignored with ``layout``.
        layout: a :class:`SegmentLayout` built once per forward (saves one all-gather per call).
        use_flex: as in ``causal_attention``; default: FlexAttention on CUDA when the segment
            has a halo (``Tq < Tk`` is outside ``causal_attention``'s own flex default).
        cu_seqlens: packed documents (``B == 1``): the WHOLE sequence's boundaries
            ``[0, ..., sum of the segment lengths]``, the same on every rank (or give a ``layout``
            built with ``documents=``); no score crosses a document boundary.

    Returns ``[B, T_r, H, Dv]``: this rank's slice of the single-device output. Every rank must
    call it and backpropagate through its output (the backward exchanges the halo's gradient).

    Example (under ``torchrun --nproc-per-node R``)::

        >>> q_r, k_r, v_r = (split_segment(x, dim=1) for x in (q, k, v))
        >>> o_r = context_parallel_attention(q_r, k_r, v_r, window=512)
        >>> o = gather_segments(o_r, dim=1)          # == causal_attention(q, k, v, window=512)
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T_r, H, D], got {getattr(x, 'shape', type(x))}")
    if k.shape[:3] != v.shape[:3] or k.shape[:2] != q.shape[:2]:
        raise ValueError(f"q [B, T_r, H, D], k [B, T_r, Hkv, D] and v [B, T_r, Hkv, Dv] must share B and T_r; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    B, T = q.shape[:2]
    layout = as_layout(layout if layout is not None else group, T, B, q.device, documents=cu_seqlens)
    if window != 1:  # a window of one sees only the query itself: nothing to exchange
        Dk = k.shape[-1]
        halo = exchange_kv_halo(torch.cat([k, v.to(k.dtype)], dim=-1), window, layout)
        k = torch.cat([halo[..., :Dk], k], dim=1)  # [B, h_r + T_r, Hkv, D]
        v = torch.cat([halo[..., Dk:].to(v.dtype), v], dim=1)
    keys = None
    if layout.documents is not None:  # the documents of the key positions [o_r - h_r, o_r + T_r)
        keys = layout.documents.segment(layout.start - (k.shape[1] - T), layout.start + T)
    if use_flex is None and k.shape[1] != T:
        use_flex = q.is_cuda
    return causal_attention(q, k, v, window=window, scale=scale, cu_seqlens=keys, use_flex=use_flex)
