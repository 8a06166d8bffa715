"""DeltaProduct as the (gated) delta rule over an interleaved sequence.

With ``n_h`` Householder steps per token, token ``t`` becomes the ``n_h`` consecutive steps
``(t, 0), ..., (t, n_h - 1)`` of one longer sequence: step ``(t, j)`` has key ``k[t, j]``, value
``v[t, j]`` and ``beta[t, j]``; the decay ``g[t]`` sits on step ``(t, 0)`` (zero log decay on the
others), and the query ``q[t]`` on step ``(t, n_h - 1)`` (zero queries elsewhere, whose outputs
are dropped). Every backend of the delta rule therefore computes DeltaProduct unchanged, and
its gradients flow back through the interleaving.
"""

from __future__ import annotations

import torch

from ..packing import PackedSequences
from .utils import _check_tensor

__all__ = ["interleave_product", "take_last_step"]


def interleave_product(q, k, v, beta, g, cu_seqlens):
    """Validate DeltaProduct inputs and map them to a delta-rule call of ``T * n_h`` steps.

    ``q: [B, T, H, K]``, ``k: [B, T, n_h, H, K]``, ``v: [B, T, n_h, H, V]``,
    ``beta: [B, T, n_h, H]``, ``g: [B, T, H]`` or None; ``cu_seqlens`` a tensor, a
    :class:`~deltanet.ops.packing.PackedSequences` or None. Returns ``(q, k, v, beta, g, cu_seqlens,
    n_h)`` in the delta rule's layout (the remaining checks are the delta rule's own)."""
    _check_tensor("q", q, 4, "[B, T, H, K]")
    _check_tensor("k", k, 5, "[B, T, n_h, H, K]")
    _check_tensor("v", v, 5, "[B, T, n_h, H, V]")
    _check_tensor("beta", beta, 4, "[B, T, n_h, H]")
    B, T, H, K = q.shape
    n_h = k.shape[2]
    if n_h < 1:
        raise ValueError(f"k must have n_h >= 1 Householder steps, got k of shape {tuple(k.shape)}")
    if tuple(k.shape) != (B, T, n_h, H, K):
        raise ValueError(f"k must have shape [B, T, n_h, H, K] = {(B, T, n_h, H, K)}, got {tuple(k.shape)}")
    if tuple(v.shape[:4]) != (B, T, n_h, H):
        raise ValueError(f"v must have shape [B, T, n_h, H, V] with (B, T, n_h, H) = {(B, T, n_h, H)} "
                         f"(n_h from k), got {tuple(v.shape)}")
    if tuple(beta.shape) != (B, T, n_h, H):
        raise ValueError(f"beta must have shape [B, T, n_h, H] = {(B, T, n_h, H)} (n_h from k), "
                         f"got {tuple(beta.shape)}")
    if g is not None:
        _check_tensor("g", g, 3, "[B, T, H]")
        if tuple(g.shape) != (B, T, H):
            raise ValueError(f"g must have shape [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    V = v.shape[-1]
    if n_h == 1:
        return q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], g, cu_seqlens, 1
    qi = torch.cat([q.new_zeros(B, T, n_h - 1, H, K), q[:, :, None]], 2).reshape(B, T * n_h, H, K)
    ki = k.reshape(B, T * n_h, H, K)
    vi = v.reshape(B, T * n_h, H, V)
    bi = beta.reshape(B, T * n_h, H)
    gi = None
    if g is not None:
        gi = torch.cat([g[:, :, None], g.new_zeros(B, T, n_h - 1, H)], 2).reshape(B, T * n_h, H)
    if isinstance(cu_seqlens, PackedSequences):
        cu_seqlens = cu_seqlens.interleaved(n_h)  # built once per batch and n_h, no host read
    elif isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = cu_seqlens * n_h
    return qi, ki, vi, bi, gi, cu_seqlens, n_h


def take_last_step(o: torch.Tensor, n_h: int) -> torch.Tensor:
    """``[B, T * n_h, H, V]`` outputs of the interleaved steps -> ``[B, T, H, V]`` (each token's last)."""
    if n_h == 1:
        return o
    B, TN, H, V = o.shape
    return o.view(B, TN // n_h, n_h, H, V)[:, :, -1]
