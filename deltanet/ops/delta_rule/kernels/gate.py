"""The gate of the gated delta rule inside the chunk kernels (README.md §7 derives every factor).

``G`` is the within-chunk cumulative log decay, ``G[t] = g[t0] + ... + g[t]`` for token ``t`` of a
chunk starting at ``t0`` (fp32). ``wy_fwd_kernel`` writes it once per call; every other gated
stage reads it, never ``g``: the chunk forms need only differences ``G_i - G_j`` inside a chunk
and ``G`` at the chunk's last token.

The gradient of ``g`` is formed where dq and dk are (``chunk_grads_kernel``, or
``dqkw_bwd_kernel`` + ``wy_bwd_kernel``), from the fp32 tiles before they are rounded, as the
chain rule through every place a chunk's G enters (README.md §7):

    dg_t = sum_{s >= t, s in t's chunk} (q_s . dq_s - k_s . dk_s + 2 beta_s dbeta^W_s)
           + exp(G_C) <h[c], dh[c]> + sum_{j in chunk} k_j . dk^S_j

with ``dbeta^W`` dbeta's W part (``rowsum(dKb * K)``), ``dk^S`` the state part of dk
(``exp(G_C - G) v_new dh[c]^T``), ``h[c]`` the state entering chunk c and ``dh[c]`` the gradient
of the one leaving it. The ``k . dk^S`` of each token and their chunk sum cancel as the same fp32
numbers.
"""

import triton
import triton.language as tl


@triton.jit
def gate_rows(g, rt, n, H: tl.constexpr):
    """G of one chunk's rows (0 past its end); ``g`` points at the chunk's first row."""
    return tl.load(g + rt * H, mask=rt < n, other=0.0)


@triton.jit
def decay(gi, gj, mask, TRANSPOSE: tl.constexpr = False):
    """``exp(G_i - G_j)`` at ``[i, j]`` where ``mask``, else 0 (``TRANSPOSE``: at ``[j, i]``, the
    mask given for that layout). The difference is masked before the exponential: above the
    diagonal (and on rows past the chunk's end) it can be large and positive."""
    if TRANSPOSE:
        return tl.exp(tl.where(mask, gi[None, :] - gj[:, None], float("-inf")))
    return tl.exp(tl.where(mask, gi[:, None] - gj[None, :], float("-inf")))


@triton.jit
def chunk_cumsum_store(g, gc, n, H: tl.constexpr, BT: tl.constexpr):
    """Write ``G`` (fp32) of one chunk from its log decays ``g`` (both point at the chunk's first row)."""
    rt = tl.arange(0, BT)
    b_g = tl.load(g + rt * H, mask=rt < n, other=0.0).to(tl.float32)
    tl.store(gc + rt * H, tl.cumsum(b_g, 0), mask=rt < n)


@triton.jit
def reverse_chunk_sum(x):
    """``sum_{s >= t} x_s`` within the chunk (``x`` zero past its end): the total minus the
    exclusive prefix sum. At most 64 terms, in fp32."""
    return tl.sum(x, 0) - tl.cumsum(x, 0) + x


@triton.jit
def gate_chunk_grads(g, rt, n, b_dq, b_dk, b_dp, H: tl.constexpr):
    """The decay factors of one chunk's state and intra-chunk gradient sums: ``dO S^T`` rows by
    exp(G_i), ``v_new dh^T`` rows by exp(G_last - G_i), dP by E. Also returns ``G`` and ``exp(G)``."""
    b_gc = gate_rows(g, rt, n, H)
    b_gl = tl.sum(tl.where(rt == n - 1, b_gc, 0.0), 0)
    b_gam = tl.exp(b_gc)
    b_dq = b_dq * b_gam[:, None]
    b_dk = b_dk * tl.exp(b_gl - b_gc)[:, None]
    b_dp = b_dp * decay(b_gc, b_gc, (rt[:, None] >= rt[None, :]) & (rt < n)[:, None])
    return b_dq, b_dk, b_dp, b_gc, b_gam
