"""Softmax attention mixers: causal full attention and sliding-window attention, RoPE, GQA.

Rotary position embeddings use per-token ``position_ids`` (the model derives them from the
padding mask or the packed-document boundaries), so a left-padded row and a packed document
see the same positions as the sequence alone. The cache keeps all keys/values for full
attention and only the last ``sliding_window`` positions for sliding attention: growing tensors
(:class:`~deltanet.models.cache.KVCache`) in eager decoding, preallocated / ring buffers written
in place (:class:`~deltanet.models.cache.StaticKVCache`) under a decode graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.attention import causal_attention, decode_attention
from ..parallel.attention import context_parallel_attention
from ..parallel.halo import SegmentLayout, check_layer_documents
from ._fused import fused
from .norm import rms_norm_linear
from .delta_net import takes_fused_decode

__all__ = ["AttentionMixer", "apply_rope", "rope_angles", "rotate"]


def rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple:
    """``(cos, sin)`` of the rotary angles, float32 ``[B, T, 1, head_dim / 2]``: one per position and
    frequency, shared by every head (and by q and k)."""
    D = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=position_ids.device, dtype=torch.float32) / D))  # [D/2]
    angles = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, T, D/2]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def _rotate_inference(x, cos, sin):
    from ..ops import glue

    half = (*x.shape[:-2], 1, x.shape[-1] // 2)  # (position_ids broadcast over the batch: the eager code)
    if (x.dtype not in glue.DTYPES or x.shape[-1] % 2 or any(t.dtype != torch.float32 or tuple(t.shape) != half
                                                            for t in (cos, sin))):
        return NotImplemented
    return glue.rope(x, cos, sin)


@fused(inference=_rotate_inference)
def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x: [B, T, H, D]`` rotated by :func:`rope_angles` (GPT-NeoX half-split layout), float32
    inside, in ``x``'s dtype. Compiled for CUDA training, one Triton kernel for CUDA inference
    (``_fused.py``)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (GPT-NeoX half-split layout). ``x: [B, T, H, D]``, ``position_ids: [B, T]``.

    Example::

        >>> x = torch.randn(1, 4, 2, 8)
        >>> torch.allclose(apply_rope(x, torch.zeros(1, 4, dtype=torch.long), 1e4), x)
        True
    """
    return rotate(x, *rope_angles(position_ids, x.shape[-1], theta))


def _cp_kwargs(context_parallel) -> dict:
    if isinstance(context_parallel, SegmentLayout):
        return {"layout": context_parallel}
    return {"group": context_parallel}


class AttentionMixer(nn.Module):
    """Causal multi-head attention with RoPE and grouped-query heads; ``window`` for sliding.

    Example::

        >>> from deltanet.models.presets import get_config
        >>> layer = AttentionMixer(get_config("tiny"), layer_idx=0, window=4)
        >>> layer(torch.randn(2, 7, 128), position_ids=torch.arange(7).expand(2, 7)).shape
        torch.Size([2, 7, 128])
    """

    def __init__(self, config, layer_idx: int, window: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.hidden_size = config.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(self.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        # one-token cached steps: "fused" runs norm + q/k/v projections and o_proj + residual as two
        # GEMV kernels (deltanet.ops.decode_linear) and, against a static cache, RoPE + cache write +
        # attention as one (deltanet.ops.decode_attention); see deltanet.layers.delta_net for the switch
        self.decode_kernel = getattr(config, "decode_kernel", "auto")

    def forward(self, x, *, position_ids, mask=None, full_mask=None, cu_seqlens=None, cache=None,
                context_parallel=None, norm=None, residual=None, **_):
        """``x: [B, T, hidden]``; ``position_ids: [B, T]``; ``full_mask: [B, past + T]`` the
        padding mask of every position so far (keys), ``cache`` updated in place.
        ``context_parallel``: a process group or :class:`~deltanet.parallel.SegmentLayout` whose
        ranks hold consecutive segments of the same rows (``position_ids`` then global); the
        keys/values before this segment come from the earlier ranks (:mod:`deltanet.parallel.attention`);
        packed documents come as the layout's ``documents`` (``cu_seqlens``: its ``local_documents``).
        ``norm``: an :class:`~deltanet.layers.RMSNorm` applied to ``x`` first; ``residual``: returns
        ``residual + attention(x)``."""
        B, T, _ = x.shape
        if context_parallel is not None and (cache is not None or full_mask is not None):
            raise ValueError("context_parallel cannot be combined with a cache or a padding mask in attention layers")
        check_layer_documents(context_parallel, cu_seqlens)
        fused = cache is not None and takes_fused_decode(self.decode_kernel, x, self.q_proj.weight)
        if fused:
            from ..ops import decode_attention as fused_attention
            from ..ops.decode_linear import rms_norm_linear_decode

            q, k, v = rms_norm_linear_decode(x, norm.weight if norm is not None else None,
                                             [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight],
                                             norm.eps if norm is not None else 0.0)  # [B, 1, N]: column slices
        elif norm is not None:  # the pre-norm with the projections: its output is recomputed in backward, not kept
            q, k, v = rms_norm_linear(x, norm.weight, [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight],
                                      norm.eps)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        state = cache.layers[self.layer_idx] if cache is not None else None
        if state is not None and not hasattr(state, "k"):
            raise TypeError(f"layer {self.layer_idx}: an attention layer needs a K/V cache entry, got {type(state).__name__}")
        static = state is not None and hasattr(state, "valid")  # a StaticKVCache: one token, in place
        if (fused and static and fused_attention.supports(self.head_dim, state.k.dtype)
                and (self.decode_kernel == "fused" or fused_attention.FUSED_ATTENTION_BY_DEFAULT)):
            # RoPE, the cache write and the attention in one kernel (the slices' strides are taken as they are)
            o = fused_attention.decode_attention_step(q, k, v, state.k, state.v, state.valid, position_ids, cache.counters.next,
                                      ring=state.ring, mask=mask, rope_theta=self.rope_theta)
            return self._out(o.reshape(B, T, self.num_heads * self.head_dim), residual, fused)
        cos, sin = rope_angles(position_ids, self.head_dim, self.rope_theta)  # once for q and k
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)

        if context_parallel is not None:
            o = context_parallel_attention(q, k, v, window=self.window, **_cp_kwargs(context_parallel))
            return self._out(o.reshape(B, T, self.num_heads * self.head_dim), residual, False)

        if static:
            o = self._static_step(q, k, v, state, cache.counters, mask)
            return self._out(o.reshape(B, T, self.num_heads * self.head_dim), residual, fused)
        if state is not None:
            if state.k is not None:
                k = torch.cat([state.k, k], dim=1)
                v = torch.cat([state.v, v], dim=1)
            # sliding layers keep only the window: older keys can never be seen again
            # (copies when cut: a view would keep the whole prompt's keys alive)
            if self.window is not None and k.shape[1] > self.window:
                state.k, state.v = k[:, -self.window:].clone(), v[:, -self.window:].clone()
            else:
                state.k, state.v = k, v
        key_mask = None
        if full_mask is not None:
            key_mask = full_mask[:, -k.shape[1]:]
            if bool(key_mask.all()):
                key_mask = None  # no padding: keep the fast path
        o = causal_attention(q, k, v, window=self.window, cu_seqlens=cu_seqlens, key_mask=key_mask)
        return self._out(o.reshape(B, T, self.num_heads * self.head_dim), residual, fused)

    def _out(self, o, residual, fused: bool):
        """``residual + o_proj(o)`` (``o_proj(o)`` without a residual); one kernel when ``fused``."""
        if fused:
            from ..ops.decode_linear import linear_residual_decode

            return linear_residual_decode(o.contiguous(), self.o_proj.weight, residual)
        y = self.o_proj(o)
        return y if residual is None else residual + y

    def _static_step(self, q, k, v, state, counters, mask):
        """One decode token against a preallocated cache: write its key/value into the slot of
        position ``counters.next`` (mod the window for a ring), then attend over every slot that
        holds a real token, plus the token itself (as the eager mask: a padded query still sees
        itself, so no row is all masked). Shapes never change; the position is a device tensor."""
        if q.shape[1] != 1:
            raise ValueError(f"a static K/V cache takes one token per step, got {q.shape[1]}")
        L = state.capacity
        slot = (counters.next % L if state.ring else counters.next).reshape(1)  # [1] long, on the device
        state.k.index_copy_(2, slot, k.transpose(1, 2).to(state.k.dtype))  # [B, Hkv, 1, D] into [B, Hkv, L, D]
        state.v.index_copy_(2, slot, v.transpose(1, 2).to(state.v.dtype))
        real = mask.bool() if mask is not None else torch.ones_like(state.valid[:, :1])  # [B, 1]
        state.valid.index_copy_(1, slot, real)
        allow = state.valid | (torch.arange(L, device=slot.device) == slot)  # [B, L]
        return decode_attention(q, state.k, state.v, allow)
