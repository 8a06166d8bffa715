"""The gradient of the log decay ``g``, shared by the Triton backends.

Dividing the gated recurrence by ``Gamma_t = exp(G_t)`` (``G_t = g_1 + ... + g_t``, per
sequence) gives the plain delta rule on ``q_t Gamma_t`` and ``v_t / Gamma_t``: the output
depends on ``g`` only through those two scalings and the final state ``S_T = Gamma_T S~_T``.
Hence (README.md, §7 "The gradient of g")

    dL/dG_t = q_t . dq_t - v_t . dv_t  (+ <S_T, dS_T> at each sequence's last token)
    dg_t    = sum_{s >= t} dL/dG_s      (reverse cumulative sum within the sequence)

with ``dq``, ``dv`` the gradients of the gated op itself. The recurrent op's launcher keeps dq
and dv in fp32 when ``g`` is given (before rounding them to the input dtype, whose rounding
error the cancellation between the two dot products would amplify), calls :func:`decay_terms`
and finishes with :func:`gate_grad` (whole sequences). The chunk op uses nothing here: its
gradient kernels form dL/dG per chunk by the chain rule through each place G enters
(``kernels/gate.py``; README.md §7 says why: from their 16-bit intermediates this identity lost
an order of magnitude in bf16). Nothing here reads ``exp(-G)``: it is exact for any decay.
"""

from __future__ import annotations

import torch

__all__ = ["decay_terms", "gate_grad"]


def decay_terms(q: torch.Tensor, dq: torch.Tensor, v: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """``q . dq - v . dv`` per token and head (fp32): ``[..., H, K]``, ``[..., H, V]`` -> ``[..., H]``."""
    # (fp32 dq, dv: the products promote to fp32 without an fp32 copy of q or v)
    return (q * dq).sum(-1, dtype=torch.float32) - (v * dv).sum(-1, dtype=torch.float32)


def gate_grad(dG: torch.Tensor, ht, dht, cu_seqlens, dtype: torch.dtype) -> torch.Tensor:
    """``dg [B, T, H]`` in ``dtype`` from the per-token terms ``dG [B, T, H]`` (:func:`decay_terms`),
    the final state ``ht`` and its gradient ``dht`` (``[N, H, K, V]`` or None)."""
    B, T, H = dG.shape
    # fp64 accumulation: the reverse sum runs over whole sequences (tens of thousands of terms).
    dG = dG.double()
    last = (ht.double() * dht.double()).sum((-2, -1)) if dht is not None else None  # [N, H]
    if cu_seqlens is None:
        if last is not None:
            dG[:, -1] += last
        return dG.flip(1).cumsum(1).flip(1).to(dtype)
    ends = cu_seqlens[1:].long()
    if last is not None:
        dG[0].index_add_(0, ends - 1, last)
    R = torch.cat([dG[0].flip(0).cumsum(0).flip(0), dG.new_zeros(1, H)])  # R[t] = sum_{s >= t}, R[T] = 0
    seq = torch.searchsorted(ends, torch.arange(T, device=dG.device), right=True)
    return (R[:T] - R[ends[seq]])[None].to(dtype)
