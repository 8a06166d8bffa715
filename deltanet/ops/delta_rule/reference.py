"""The (gated) delta rule, one token at a time: the oracle every other backend is tested against.

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = scale * S_t^T q_t

(``g = None``: no decay, the plain delta rule.)

Written for clarity, not speed: a Python loop over tokens, plain autograd. Computes in float32,
or float64 when given float64 inputs.
"""

from __future__ import annotations

import torch

from ..packing import PackedSequences
from .utils import check_inputs, seq_lengths

__all__ = ["delta_product_reference", "delta_rule_reference"]


def _recurrence(q, k, v, beta, g, S):
    """One sequence. ``q, k: [T, H, K]``, ``v: [T, H, V]``, ``beta, g: [T, H]`` (g or None),
    ``S: [H, K, V]``."""
    outs = []
    for t in range(q.shape[0]):
        k_t, v_t, b_t = k[t], v[t], beta[t]  # [H, K], [H, V], [H]
        if g is not None:  # decay first: exp(g) (I - b k k^T) S = (I - b k k^T) (exp(g) S)
            S = S * g[t].exp()[:, None, None]
        v_old = torch.einsum("hk,hkv->hv", k_t, S)  # what the memory returns for k_t
        S = S + torch.einsum("hk,hv->hkv", b_t[:, None] * k_t, v_t - v_old)
        outs.append(torch.einsum("hk,hkv->hv", q[t], S))
    return torch.stack(outs), S


def delta_rule_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | PackedSequences | None = None,
    g: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step (gated) delta rule. Same contract as :func:`deltanet.ops.delta_rule`.

    Example::

        >>> q, k = torch.randn(2, 2, 10, 1, 4).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> v, beta = torch.randn(1, 10, 1, 3), torch.rand(1, 10, 1)
        >>> o, S = delta_rule_reference(q, k, v, beta, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([1, 10, 1, 3]), torch.Size([1, 1, 4, 3]))
    """
    shape = check_inputs(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g)
    H, K, V = shape.H, shape.K, shape.V
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    qf, kf, vf, bf = (x.to(dtype) for x in (q, k, v, beta))
    qf = qf * shape.scale
    gf = g.to(dtype) if g is not None else None

    outs, finals = [], []
    for i, (b, s, e) in enumerate(seq_lengths(shape)):
        if initial_state is not None:
            S0 = initial_state[i].to(dtype)
        else:
            S0 = q.new_zeros((H, K, V), dtype=dtype)
        o, S = _recurrence(qf[b, s:e], kf[b, s:e], vf[b, s:e], bf[b, s:e], gf[b, s:e] if gf is not None else None, S0)
        outs.append(o)
        finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs)  # [B, T, H, V]
    else:
        o = torch.cat(outs)[None]  # [1, T, H, V]
    final_state = torch.stack(finals).to(torch.float32 if dtype != torch.float64 else dtype) if output_final_state else None
    return o.to(v.dtype), final_state


def delta_product_reference(q, k, v, beta, *, g=None, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """DeltaProduct written out step by step, straight from its definition (the oracle of
    :func:`deltanet.ops.delta_product`, which runs the interleaved delta rule instead):
    per token, ``S <- exp(g_t) S``, then ``n_h`` Householder steps in order, then the output.
    Shapes as :func:`deltanet.ops.delta_product`; computes in float64 for float64 inputs."""
    from .product import interleave_product  # validation only

    _, _, _, _, _, _, n_h = interleave_product(q, k, v, beta, g, cu_seqlens)
    B, T, H, K = q.shape
    V = v.shape[-1]
    shape = check_inputs(q, k[:, :, 0], v[:, :, 0], beta[:, :, 0], scale, initial_state, output_final_state,
                         cu_seqlens, g)
    scale = shape.scale
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    bounds = seq_lengths(shape)
    outs, finals = [], []
    for i, (b, s, e) in enumerate(bounds):
        S = initial_state[i].to(dtype) if initial_state is not None else q.new_zeros((H, K, V), dtype=dtype)
        for t in range(s, e):
            if g is not None:
                S = S * g[b, t].to(dtype).exp()[:, None, None]
            for j in range(n_h):
                k_j, v_j, b_j = k[b, t, j].to(dtype), v[b, t, j].to(dtype), beta[b, t, j].to(dtype)
                S = S - torch.einsum("hk,hv->hkv", b_j[:, None] * k_j, torch.einsum("hk,hkv->hv", k_j, S) - v_j)
            outs.append(scale * torch.einsum("hk,hkv->hv", q[b, t].to(dtype), S))
        finals.append(S)
    o = torch.stack(outs).view(B, T, H, V) if cu_seqlens is None else torch.stack(outs)[None]
    return o.to(v.dtype), (torch.stack(finals) if output_final_state else None)
