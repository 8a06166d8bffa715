"""The chunkwise (WY / UT-transform) delta rule in plain PyTorch: any device, plain autograd.

For each chunk of C tokens (README.md in this folder derives it):

    A  = tril(diag(beta) K K^T, -1)        T = (I + A)^-1 diag(beta)      (UT transform)
    W  = T K        U = T V                                                 (WY form)
    U' = U - W S                                                            (pseudo-values)
    O  = scale * (Q S + tril(Q K^T) U')    S <- S + K^T U'

Everything except the last line is batched over all chunks at once; only the state recurrence
loops, once per chunk (T / C small matmuls). Autograd keeps one state per chunk, never one per
token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .utils import check_inputs

__all__ = ["delta_rule_chunkwise_torch"]


def _pack(x: torch.Tensor, offsets: list[int], Tp: int) -> torch.Tensor:
    """``[1, T, ...]`` packed sequences -> ``[N, Tp, ...]`` zero-padded at the end."""
    seqs = [x[0, s:e] for s, e in zip(offsets[:-1], offsets[1:])]
    return torch.stack([F.pad(s, (0, 0) * (x.ndim - 2) + (0, Tp - s.shape[0])) for s in seqs])


def _chunk_fwd(q, k, v, beta, S, C: int):
    """Batched core. ``q, k: [N, T, H, K]``, ``v: [N, T, H, V]``, ``beta: [N, T, H]`` with
    ``T % C == 0``; ``S: [N, H, K, V]``. Returns ``o: [N, T, H, V]`` and the final state."""
    N, T, H, K = q.shape
    V = v.shape[-1]
    NT = T // C
    # [N, H, NT, C, D]: chunk-major so that intra-chunk products batch over (N, H, NT).
    q, k, v = (x.reshape(N, NT, C, H, -1).permute(0, 3, 1, 2, 4) for x in (q, k, v))
    beta = beta.reshape(N, NT, C, H).permute(0, 3, 1, 2)  # [N, H, NT, C]

    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(0)

    kb = k * beta[..., None]
    A = (kb @ k.transpose(-1, -2)).masked_fill(~strict, 0)  # [N, H, NT, C, C]
    # T = (I + A)^-1 diag(beta): a unit-lower-triangular solve, applied to [beta*K | beta*V].
    rhs = torch.cat([kb, v * beta[..., None]], dim=-1)
    WU = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    W, U = WU.split([K, V], dim=-1)
    attn = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0)  # [N, H, NT, C, C]

    outs = []
    for i in range(NT):
        u = U[:, :, i] - W[:, :, i] @ S  # pseudo-values [N, H, C, V]
        outs.append(q[:, :, i] @ S + attn[:, :, i] @ u)
        S = S + k[:, :, i].transpose(-1, -2) @ u
    o = torch.stack(outs, dim=2)  # [N, H, NT, C, V]
    return o.permute(0, 2, 3, 1, 4).reshape(N, T, H, V), S


def delta_rule_chunkwise_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise delta rule in PyTorch. Same contract as :func:`deltanet.ops.delta_rule`.

    Computes in float32 (float64 for float64 inputs) whatever the input dtype; returns
    ``o`` in ``v.dtype`` and the final state in float32 (float64 for float64 inputs).

    Example::

        >>> q, k = torch.randn(2, 1, 100, 2, 16).unbind(0)
        >>> k = torch.nn.functional.normalize(k, dim=-1)
        >>> v, beta = torch.randn(1, 100, 2, 8), torch.rand(1, 100, 2)
        >>> o, S = delta_rule_chunkwise_torch(q, k, v, beta, output_final_state=True, chunk_size=32)
        >>> o.shape, S.shape
        (torch.Size([1, 100, 2, 8]), torch.Size([1, 2, 16, 8]))
    """
    shape = check_inputs(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K, V, N = shape.B, shape.T, shape.H, shape.K, shape.V, shape.N
    out_dtype = v.dtype
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    q = q * shape.scale
    C = chunk_size

    # Pad each sequence at its end to a multiple of C. Padded tokens have k = 0 and beta = 0,
    # so they leave the state untouched (the final state stays exact) and their outputs are
    # dropped below.
    if cu_seqlens is not None:
        offsets = cu_seqlens.tolist()
        Tp = -(-max(e - s for s, e in zip(offsets[:-1], offsets[1:])) // C) * C
        q, k, v, beta = (_pack(x, offsets, Tp) for x in (q, k, v, beta))
    else:
        Tp = -(-T // C) * C
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, Tp - T)) for x in (q, k, v))
        beta = F.pad(beta, (0, 0, 0, Tp - T))

    S0 = initial_state.to(dtype) if initial_state is not None else q.new_zeros(N, H, K, V)
    o, S = _chunk_fwd(q, k, v, beta, S0, C)

    if cu_seqlens is not None:
        o = torch.cat([o[i, : e - s] for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:]))])[None]
    else:
        o = o[:, :T]
    final_state = S if output_final_state else None
    return o.to(out_dtype), final_state
