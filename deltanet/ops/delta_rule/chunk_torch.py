"""The chunkwise (WY / UT-transform) delta rule in plain PyTorch: any device, plain autograd.

For each chunk of C tokens (README.md in this folder derives it):

    A  = tril(diag(beta) K K^T, -1)        T = (I + A)^-1 diag(beta)      (UT transform)
    W  = T K        U = T V                                                 (WY form)
    U' = U - W S                                                            (pseudo-values)
    O  = scale * (Q S + tril(Q K^T) U')    S <- S + K^T U'

Gated (``g`` given; ``G`` the within-chunk cumulative sum of g, ``Gamma = exp(G)``,
``E_ij = exp(G_i - G_j)`` for i >= j, formed from the masked difference so it never overflows):

    A  = tril(diag(beta) (K K^T * E), -1)     W = T (Gamma K)     U = T V
    O  = scale * (Gamma Q S + tril(Q K^T * E) U')
    S <- exp(G_C) S + (exp(G_C - G) K)^T U'

Everything except the last line is batched over all chunks at once; only the state recurrence
loops, once per chunk (two small matmuls); the outputs are then one batched product. One state
per chunk is kept (T / C of them), never one per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import PackedSequences
from .utils import check_inputs

__all__ = ["delta_rule_chunkwise_torch"]


def _pack(x: torch.Tensor, offsets: tuple[int, ...], Tp: int) -> torch.Tensor:
    """``[1, T, ...]`` packed sequences -> ``[N, Tp, ...]`` zero-padded at the end."""
    seqs = [x[0, s:e] for s, e in zip(offsets[:-1], offsets[1:])]
    return torch.stack([F.pad(s, (0, 0) * (x.ndim - 2) + (0, Tp - s.shape[0])) for s in seqs])


def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)^-1`` for strictly lower-triangular ``A [..., C, C]``, batched over leading dims.

    Recursive 2x2 blocking, ``[[L11, 0], [L21, L22]]^-1 = [[X11, 0], [-X22 L21 X11, X22]]``,
    down to 16x16 blocks, where ``(I - N)^-1 = (I + N)(I + N^2)(I + N^4)(I + N^8)`` (``N = -A``
    is nilpotent). Only batched matmuls: on CPU far faster than a batched
    ``torch.linalg.solve_triangular`` over many tiny systems, and plain autograd.
    """
    C = A.shape[-1]
    if C <= 16:
        N = -A
        R = torch.eye(C, dtype=A.dtype, device=A.device) + N
        span = 2  # R = sum_{i < span} N^i
        while span < C:
            N = N @ N
            R = R + R @ N
            span *= 2
        return R
    h = C // 2
    X11 = _unit_lower_inverse(A[..., :h, :h])
    X22 = _unit_lower_inverse(A[..., h:, h:])
    X21 = -X22 @ (A[..., h:, :h] @ X11)
    top = torch.cat([X11, torch.zeros_like(A[..., :h, h:])], dim=-1)
    return torch.cat([top, torch.cat([X21, X22], dim=-1)], dim=-2)


def decay_matrix(G: torch.Tensor, diagonal: int) -> torch.Tensor:
    """``E_ij = exp(G_i - G_j)`` on ``tril(., diagonal)``, 0 above, for ``G [..., C]``.

    The difference is masked to -inf before the exponential: with strong decay ``G_i - G_j``
    above the diagonal is large and positive, and ``exp(G_i) * exp(-G_j)`` would overflow."""
    C = G.shape[-1]
    mask = torch.ones(C, C, dtype=torch.bool, device=G.device).tril(diagonal)
    return torch.where(mask, G[..., :, None] - G[..., None, :], float("-inf")).exp()


def _chunk_fwd(q, k, v, beta, g, S, C: int):
    """Batched core. ``q, k: [N, T, H, K]``, ``v: [N, T, H, V]``, ``beta, g: [N, T, H]`` (g or
    None) with ``T % C == 0``; ``S: [N, H, K, V]``. Returns ``o: [N, T, H, V]`` and the final state."""
    N, T, H, K = q.shape
    V = v.shape[-1]
    NT = T // C
    # [NT, N*H, C, D], contiguous: chunk-major, so the sequential loop below reads contiguous
    # slices with (N, H) folded into one batch dim for bmm/baddbmm; the intra-chunk products
    # batch over all chunks at once.
    q, k, v = (x.reshape(N, NT, C, H, -1).permute(1, 0, 3, 2, 4).reshape(NT, N * H, C, -1) for x in (q, k, v))
    beta = beta.reshape(N, NT, C, H).permute(1, 0, 3, 2).reshape(NT, N * H, C, 1)

    NH = N * H
    if g is not None:  # within-chunk cumulative log decay, [NT * N * H, C, 1]
        G = g.reshape(N, NT, C, H).permute(1, 0, 3, 2).reshape(NT * NH, C).cumsum(-1)
    # Flatten (chunk, sequence, head) into one batch dim: explicit 3-D bmm calls, merged where
    # they share an operand, keep the CPU path at a handful of large BLAS calls.
    q, k, v, beta = (x.reshape(NT * NH, C, -1) for x in (q, k, v, beta))
    kb = k * beta
    kt = k.transpose(-1, -2)
    A = torch.bmm(kb, kt).tril_(-1)  # the UT-transform matrix, strictly lower
    attn = torch.bmm(q, kt).tril_(0)  # intra-chunk scores, diagonal included
    if g is not None:
        A = A * decay_matrix(G, -1)
        attn = attn * decay_matrix(G, 0)
        gam = G.exp()[..., None]  # [NT * NH, C, 1]
        q = q * gam  # the Q S term sees the decay since the chunk start
        kw = kb * gam  # W = T (Gamma K)
        # exp(G_C - G_j): how much of token j's write survives to the chunk end
        kd = (k * (G[:, -1:, None] - G[..., None]).exp()).transpose(-1, -2).reshape(NT, NH, K, C)
        gC = G[:, -1].exp().reshape(NT, NH, 1, 1)
    else:
        kw = kb
    # T = (I + A)^-1 diag(beta): W = T K = (I + A)^-1 beta*K, U = T V = (I + A)^-1 beta*V.
    # Two products rather than one on [beta*K | beta*V]: W[i] and U[i] must be contiguous, or
    # every baddbmm in the loop below copies its operands first.
    Ainv = _unit_lower_inverse(A)
    W = torch.bmm(Ainv, kw).view(NT, NH, C, K)
    U = torch.bmm(Ainv, v * beta).view(NT, NH, C, V)
    kt = kt.view(NT, NH, K, C)

    # The only sequential part: per chunk, pseudo-values u = U - W S and S <- S + K^T u.
    S = S.reshape(NH, K, V)
    states, pseudo = [], []
    for i in range(NT):
        u = torch.baddbmm(U[i], W[i], S, alpha=-1)  # [N*H, C, V]
        states.append(S)
        pseudo.append(u)
        if g is None:
            S = torch.baddbmm(S, kt[i], u)
        else:
            S = torch.baddbmm(S * gC[i], kd[i], u)
    Sc = torch.stack(states).view(NT * NH, K, V)
    u = torch.stack(pseudo).view(NT * NH, C, V)

    o = torch.baddbmm(torch.bmm(attn, u), q, Sc)  # Q S + tril(Q K^T) U'
    o = o.reshape(NT, N, H, C, V).permute(1, 0, 3, 2, 4).reshape(N, T, H, V)
    return o, S.reshape(N, H, K, V)


def delta_rule_chunkwise_torch(
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
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise (gated) delta rule in PyTorch. Same contract as :func:`deltanet.ops.delta_rule`.

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
    shape = check_inputs(q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, g)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    T, H, K, V, N = shape.T, shape.H, shape.K, shape.V, shape.N
    out_dtype = v.dtype
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    # The decay in fp32 (fp64 for fp64 inputs) whatever g's dtype.
    g = g.to(dtype) if g is not None else None
    C = chunk_size

    # Pad each sequence at its end to a multiple of C. Padded tokens have k = 0, beta = 0 and
    # g = 0, so they leave the state untouched (the final state stays exact) and their outputs
    # are dropped below.
    if cu_seqlens is not None:
        offsets = shape.offsets
        Tp = -(-max(e - s for s, e in zip(offsets[:-1], offsets[1:])) // C) * C
        q, k, v, beta = (_pack(x, offsets, Tp) for x in (q, k, v, beta))
        g = _pack(g, offsets, Tp) if g is not None else None
    else:
        Tp = -(-T // C) * C
        if Tp != T:  # F.pad copies even when it pads nothing
            q, k, v = (F.pad(x, (0, 0, 0, 0, 0, Tp - T)) for x in (q, k, v))
            beta = F.pad(beta, (0, 0, 0, Tp - T))
            g = F.pad(g, (0, 0, 0, Tp - T)) if g is not None else None

    S0 = initial_state.to(dtype) if initial_state is not None else q.new_zeros(N, H, K, V)
    o, S = _chunk_fwd(q, k, v, beta, g, S0, C)
    o = o * shape.scale  # o is linear in q: scaling the output saves a pass over q

    if cu_seqlens is not None:
        o = torch.cat([o[i, : e - s] for i, (s, e) in enumerate(zip(offsets[:-1], offsets[1:]))])[None]
    else:
        o = o[:, :T]
    final_state = S if output_final_state else None
    return o.to(out_dtype), final_state
