"""Causal softmax attention, full or sliding-window, for packed, padded and cached batches.

One function, :func:`causal_attention`, with three paths chosen by what the call needs:

- plain causal attention on any device -> ``F.scaled_dot_product_attention(is_causal=True)``
  (the FlashAttention kernel on CUDA);
- a sliding window or packed documents (``cu_seqlens``) on CUDA -> FlexAttention with a block
  mask, so only the blocks inside the window / the document are computed;
- everything else (CPU, key padding, decoding against a cache) -> SDPA with an explicit
  boolean mask, which is always correct.

Convention: the last query is aligned with the last key, i.e. query ``i`` of ``Tq`` sits at key
position ``Tk - Tq + i``. That covers training (``Tq == Tk``) and decoding against a cache
(``Tq`` new tokens, ``Tk`` = cached + new keys) with one mask rule:

    key j is visible to query i  iff  j <= pos(i)  and  pos(i) - j < window  and  key j is valid
                                       and  doc(j) == doc(i)

A query always sees itself, so rows made only of padding stay finite (their outputs are
garbage, and ignored by the caller).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .packing import PackedSequences, as_packed

__all__ = ["causal_attention", "decode_attention"]


def _check(q, k, v, window, cu_seqlens, key_mask) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, T, H, D], got {getattr(x, 'shape', type(x))}")
    B, Tq, H, D = q.shape
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k [B, Tk, Hkv, D] and v [B, Tk, Hkv, Dv] must share B, Tk, Hkv; got {tuple(k.shape)}, {tuple(v.shape)}")
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape[3] != D:
        raise ValueError(f"k must have head dim {D} like q, got {k.shape[3]}")
    if H % Hkv:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of key/value heads ({Hkv})")
    if Tq > Tk:
        raise ValueError(f"q has more positions ({Tq}) than k ({Tk}); the last query aligns with the last key")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens requires B == 1, got B = {B}")
    if key_mask is not None and tuple(key_mask.shape) != (B, Tk):
        raise ValueError(f"key_mask must have shape [B, Tk] = {(B, Tk)}, got {tuple(key_mask.shape)}")


def _dense_mask(B, Tq, Tk, window, packed: PackedSequences | None, key_mask, device) -> torch.Tensor:
    """Boolean ``[B, 1, Tq, Tk]`` (True = attend) implementing the rule in the module docstring."""
    qpos = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    kpos = torch.arange(Tk, device=device)[None, :]
    allow = kpos <= qpos
    if window is not None:
        allow = allow & (qpos - kpos < window)
    if packed is not None:
        doc = packed.doc_ids
        allow = allow & (doc[Tk - Tq:, None] == doc[None, :])
    allow = allow[None, None].expand(B, 1, Tq, Tk)
    if key_mask is not None:
        allow = allow & key_mask.bool()[:, None, None, :]
        allow = allow | (qpos == kpos)[None, None]  # a query always sees itself: no all-masked rows
    return allow


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _block_mask(Tq: int, Tk: int, window: int | None, doc: torch.Tensor | None, device):
    from torch.nn.attention.flex_attention import create_block_mask

    shift = Tk - Tq  # the last query aligns with the last key (a context-parallel halo: Tq < Tk)

    def mask_mod(b, h, qi, kj):
        pos = qi + shift
        allow = kj <= pos
        if window is not None:
            allow = allow & (pos - kj < window)
        if doc is not None:
            allow = allow & (doc[pos] == doc[kj])
        return allow

    return create_block_mask(mask_mod, None, None, Tq, Tk, device=device)


@functools.lru_cache(maxsize=16)
def _window_block_mask(Tq: int, Tk: int, window: int | None, device: torch.device):
    # every sliding layer of every step shares this mask: build it once per (Tq, Tk, window)
    return _block_mask(Tq, Tk, window, None, device)


_DOCUMENT_BLOCK_MASKS: dict = {}  # (T, window, host boundaries, device) -> block mask, the last 4


def _document_block_mask(Tq: int, window: int | None, packed: PackedSequences):
    # built once per batch, shared by every attention layer of the forward (and its backward);
    # keyed by the host boundaries, so a later batch with the same documents reuses it
    key = (Tq, packed.total_tokens, window, packed.offsets, packed.device)
    if key not in _DOCUMENT_BLOCK_MASKS:
        while len(_DOCUMENT_BLOCK_MASKS) >= 4:
            _DOCUMENT_BLOCK_MASKS.pop(next(iter(_DOCUMENT_BLOCK_MASKS)))
        T = packed.total_tokens
        _DOCUMENT_BLOCK_MASKS[key] = _block_mask(Tq, T, window, packed.doc_ids, packed.device)
    return _DOCUMENT_BLOCK_MASKS[key]


def _flex(q, k, v, scale, window, packed: PackedSequences | None, compiled: bool):
    """FlexAttention path (``[B, H, T, D]`` layout inside): only blocks inside the mask run."""
    from torch.nn.attention.flex_attention import flex_attention

    if packed is None:
        block_mask = _window_block_mask(q.shape[2], k.shape[2], window, q.device)
    else:
        block_mask = _document_block_mask(q.shape[2], window, packed)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    window: int | None = None,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    key_mask: torch.Tensor | None = None,
    use_flex: bool | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) softmax attention.

    Args:
        q: ``[B, Tq, H, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, Dv]`` with ``H % Hkv == 0``
            (grouped-query attention) and ``Tq <= Tk`` (the last query aligns with the last key).
        scale: softmax scale, default ``D ** -0.5``.
        window: each query sees at most the ``window`` most recent positions, itself included.
        cu_seqlens: ``[0, ..., Tk]`` document starts of a packed batch (``B == 1``) over the KEY
            positions (the queries are the last ``Tq`` of them: ``Tq < Tk`` for a context-parallel
            segment after its halo), a tensor or a :class:`~deltanet.ops.packing.PackedSequences`
            (a tensor is read to the host here).
        key_mask: ``[B, Tk]``, 1 for real tokens and 0 for padding.
        use_flex: force (True) or forbid (False) the FlexAttention path (it ignores ``key_mask``;
            ``Tq < Tk`` is fine, as for a context-parallel segment after its K/V halo); default:
            on CUDA when a window or ``cu_seqlens`` is given, there is no ``key_mask`` and ``Tq == Tk``.

    Returns:
        ``[B, Tq, H, Dv]`` in ``q.dtype``.

    Example::

        >>> q, k, v = torch.randn(3, 2, 10, 4, 8).unbind(0)
        >>> causal_attention(q, k, v, window=3).shape
        torch.Size([2, 10, 4, 8])
    """
    _check(q, k, v, window, cu_seqlens, key_mask)
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if window is not None and window >= Tk:
        window = None  # the window covers everything: plain causal, which has the fast path
    packed = as_packed(cu_seqlens, Tk)
    if packed is not None and packed.num_seqs == 1:
        packed = None  # one document
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]

    structured = window is not None or packed is not None
    if use_flex is None:
        use_flex = q.is_cuda and structured and key_mask is None and Tq == Tk
    if use_flex:
        o = _flex(qt, kt, vt, scale, window, packed, compiled=q.is_cuda)
        return o.transpose(1, 2)

    if Hkv != H:
        kt, vt = (x.repeat_interleave(H // Hkv, dim=1) for x in (kt, vt))
    if not structured and key_mask is None and Tq == Tk:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    elif not structured and key_mask is None and Tq == 1:
        o = F.scaled_dot_product_attention(qt, kt, vt, scale=scale)  # one new token sees all keys
    else:
        mask = _dense_mask(B, Tq, Tk, window, packed, key_mask, q.device)
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allow: torch.Tensor,
                     *, scale: float | None = None) -> torch.Tensor:
    """One query per row against a static (preallocated or ring) K/V cache.

    Args:
        q: ``[B, 1, H, D]``; k: ``[B, Hkv, L, D]``, v: ``[B, Hkv, L, Dv]`` (head-major cache
            layout, ``H % Hkv == 0``; query head ``h`` reads key/value head ``h // (H / Hkv)``).
        allow: ``[B, L]`` bool, the slots this query attends to (slot order is irrelevant:
            softmax attention is a set operation once RoPE is inside the keys).

    Returns ``[B, 1, H, Dv]`` in ``q.dtype``. Grouped heads are a batched matmul over
    ``[B, Hkv]`` (no repeated keys), scores and softmax in float32
    (float64 for float64 inputs).

    Example::

        >>> q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
        >>> decode_attention(q, k, v, torch.ones(2, 5, dtype=torch.bool)).shape
        torch.Size([2, 1, 4, 8])
    """
    B, Tq, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if Tq != 1 or H % Hkv or k.shape[0] != B or tuple(allow.shape) != (B, L):
        raise ValueError(f"decode_attention: q [B, 1, H, D], k/v [B, Hkv, L, D] with H % Hkv == 0 and allow "
                         f"[B, L]; got q {tuple(q.shape)}, k {tuple(k.shape)}, allow {tuple(allow.shape)}")
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, Hkv, H // Hkv, D).to(k.dtype)  # [B, Hkv, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [B, Hkv, G, L]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    scores = scores.masked_fill(~allow[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1).to(v.dtype)
    o = torch.matmul(p, v)  # [B, Hkv, G, Dv]
    return o.reshape(B, 1, H, v.shape[-1]).to(q.dtype)
