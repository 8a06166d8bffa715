"""The delta rule, one token at a time: the oracle every other backend is tested against.

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = scale * S_t^T q_t

Written for clarity, not speed: a Python loop over tokens, plain autograd. Computes in float32,
or float64 when given float64 inputs.
"""

from __future__ import annotations

import torch

from .utils import check_inputs, seq_lengths

__all__ = ["delta_rule_reference"]


def _recurrence(q, k, v, beta, S):
    """One sequence. ``q, k: [T, H, K]``, ``v: [T, H, V]``, ``beta: [T, H]``, ``S: [H, K, V]``."""
    outs = []
    for t in range(q.shape[0]):
        k_t, v_t, b_t = k[t], v[t], beta[t]  # [H, K], [H, V], [H]
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
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step-by-step delta rule. Same contract as :func:`deltanet.ops.delta_rule`.

    Example::

        >>> q, k = torch.randn(2, 2, 10, 1, 4).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> v, beta = torch.randn(1, 10, 1, 3), torch.rand(1, 10, 1)
        >>> o, S = delta_rule_reference(q, k, v, beta, output_final_state=True)
        >>> o.shape, S.shape
        (torch.Size([1, 10, 1, 3]), torch.Size([1, 1, 4, 3]))
    """
    shape = check_inputs(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens)
    H, K, V = shape.H, shape.K, shape.V
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    qf, kf, vf, bf = (x.to(dtype) for x in (q, k, v, beta))
    qf = qf * shape.scale

    outs, finals = [], []
    for i, (b, s, e) in enumerate(seq_lengths(shape)):
        if initial_state is not None:
            S0 = initial_state[i].to(dtype)
        else:
            S0 = q.new_zeros((H, K, V), dtype=dtype)
        o, S = _recurrence(qf[b, s:e], kf[b, s:e], vf[b, s:e], bf[b, s:e], S0)
        outs.append(o)
        finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs)  # [B, T, H, V]
    else:
        o = torch.cat(outs)[None]  # [1, T, H, V]
    final_state = torch.stack(finals).to(torch.float32 if dtype != torch.float64 else dtype) if output_final_state else None
    return o.to(v.dtype), final_state
