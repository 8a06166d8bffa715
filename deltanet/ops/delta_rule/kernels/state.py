"""The inter-chunk state recurrence, forward and reverse (the only sequential stage).

One program per (sequence, head, V-block) walks the chunks of its sequence in order, holding
its ``[K, BV]`` slice of the state in fp32 registers:

    forward:  h[c] = S;  v_new = U - W S;  S <- S + K^T v_new
    (backward, with the forward's v_new kept: h[c] = S;  S <- S + K^T v_new, a prefix sum)
    reverse:  dh[c] = G; dv = scale * triu(K Q^T) dO + K G;  G <- G + scale Q^T dO - W^T dv

``G`` is the gradient of the loss with respect to the state at the end of the chunk.
Gated (``USE_G``, ``g`` the within-chunk cumulative log decay, ``gl`` its value at the chunk's
last token): ``S <- exp(gl) S + (exp(gl - g) K)^T v_new``; in reverse ``dv`` sees
``triu(K Q^T * E^T)`` and ``exp(gl - g) K``, and ``G <- exp(gl) G + scale (exp(g) Q)^T dO - W^T dv``. The
V-blocks are independent (every product contracts over K or over tokens), which is what
lets the state be split across programs. ``h`` / ``dh`` are written in the input dtype
(they feed tensor-core products), the carried state stays fp32.
"""

import triton
import triton.language as tl

from .gate import decay


@triton.jit
def _sequence(cu_seqlens, chunk_offsets, i_nh, H: tl.constexpr, BT: tl.constexpr):
    """``(i_h, bos, eos, boh, NT)`` of program ``i_nh``: head, token range, first chunk, chunks."""
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    return i_h, bos, eos, boh, tl.cdiv(eos - bos, BT)


@triton.jit
def _chunk_tiles(bos, eos, c, i_h, rt, rk, rv, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                 BT: tl.constexpr, ADDR64: tl.constexpr):
    """Addressing of chunk ``c``'s ``[BT, BK]`` and ``[BT, BV]`` tiles: ``(xk, xv, tk, tv, mk, mv)``,
    a tile is at ``ptr + x + t`` under mask ``m`` (see ``ADDR64`` in ``h_fwd_kernel``)."""
    n = tl.minimum(eos - bos - c * BT, BT).to(tl.int32)
    mt = rt < n
    if ADDR64:  # int64 offsets from the token index: loop-variant, so never hoisted
        t = bos + c * BT + rt
        xk, xv = 0, 0
        tk = (t[:, None] * H + i_h) * K + rk[None, :]
        tv = (t[:, None] * H + i_h) * V + rv[None, :]
    else:  # scalar base + int32 offsets (loop-invariant: the compiler keeps them live)
        row = (bos + c * BT) * H + i_h
        xk, xv = row * K, row * V
        tk = rt[:, None] * (H * K) + rk[None, :]
        tv = rt[:, None] * (H * V) + rv[None, :]
    mk = mt[:, None] & (rk[None, :] < K)
    mv = mt[:, None] & (rv[None, :] < V)
    return xk, xv, tk, tv, mk, mv


@triton.jit
def _chunk_gate(g, bos, eos, c, i_h, rt, H: tl.constexpr, BT: tl.constexpr):
    """``(G of chunk c's rows (0 past the end), G at its last token, valid rows)``."""
    n = tl.minimum(eos - bos - c * BT, BT).to(tl.int32)
    b_g = tl.load(g + (bos + c * BT + rt) * H + i_h, mask=rt < n, other=0.0)
    return b_g, tl.sum(tl.where(rt == n - 1, b_g, 0.0), 0), n


@triton.jit
def h_fwd_kernel(
    k, w, u, v_new, g, h, h0, ht, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, PREC: tl.constexpr, ADDR64: tl.constexpr = False,
    KNOWN_VNEW: tl.constexpr = False, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(V, BV), N * H)``; ``BK`` covers all of K (a power of two >= K).

    ``KNOWN_VNEW``: ``v_new`` is an input (the forward's, kept for the backward) and ``w``, ``u``
    are unused: the states are then a prefix sum of ``K^T v_new``, one product per chunk on the
    sequential path instead of two dependent ones.

    ``ADDR64``: how tiles are addressed. False: a scalar base per chunk plus int32 offsets
    (``wy._chunk_base``); those offsets are loop-invariant and stay live in registers, which
    at K = 128 is still far cheaper (spills 0 vs 120-330 B at V-block 16) but at K = 64 costs
    more than the int64 token-index offsets (True: 880 vs 8 B at V-block 64, 4 warps).
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, boh, NT = _sequence(cu_seqlens, chunk_offsets, i_nh, H, BT)

    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mkv = (rk[:, None] < K) & (rv[None, :] < V)
    s_off = rk[:, None] * V + rv[None, :]

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_s += tl.load(h0 + i_nh.to(tl.int64) * K * V + s_off, mask=mkv, other=0.0)
    for c in range(0, NT):
        xk, xv, tk, tv, mk, mv = _chunk_tiles(bos, eos, c, i_h, rt, rk, rv, H, K, V, BT, ADDR64)
        tl.store(h + ((boh + c) * H + i_h) * K * V + s_off, b_s.to(h.dtype.element_ty), mask=mkv)
        b_k = tl.load(k + xk + tk, mask=mk, other=0.0)
        if KNOWN_VNEW:
            b_vn = tl.load(v_new + xv + tv, mask=mv, other=0.0)
        else:
            b_w = tl.load(w + xk + tk, mask=mk, other=0.0)
            b_u = tl.load(u + xv + tv, mask=mv, other=0.0)
            b_vn = b_u.to(tl.float32) - tl.dot(b_w, b_s.to(b_w.dtype), input_precision=PREC)
            b_vn = b_vn.to(v_new.dtype.element_ty)
            tl.store(v_new + xv + tv, b_vn, mask=mv)
        if USE_G:
            b_gc, b_gl, _ = _chunk_gate(g, bos, eos, c, i_h, rt, H, BT)
            b_k = (b_k * tl.exp(b_gl - b_gc)[:, None]).to(b_k.dtype)
            b_s = b_s * tl.exp(b_gl)
        b_s += tl.dot(tl.trans(b_k), b_vn.to(b_k.dtype), input_precision=PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + s_off, b_s, mask=mkv)


@triton.jit
def dh_bwd_kernel(
    q, k, w, g, do, dv, dh, dht, dh0, cu_seqlens, chunk_offsets, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
    ADDR64: tl.constexpr = False, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(V, BV), N * H)``. Writes ``dh[c]`` (state grad after chunk c), ``dv``
    (the gradient of the pseudo-values ``v_new``) and ``dh0``. The intra-chunk term
    ``scale * triu(K Q^T) dO`` is formed here, on the sequential path (as its own parallel
    kernel it measured slower: results/2026-11-30-h200-kernels-tuned-vs-fla.md)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_h, bos, eos, boh, NT = _sequence(cu_seqlens, chunk_offsets, i_nh, H, BT)

    rt = tl.arange(0, BT)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mkv = (rk[:, None] < K) & (rv[None, :] < V)
    s_off = rk[:, None] * V + rv[None, :]
    upper = rt[:, None] <= rt[None, :]

    b_g = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_g += tl.load(dht + i_nh.to(tl.int64) * K * V + s_off, mask=mkv, other=0.0)
    for i in range(0, NT):
        c = NT - 1 - i
        xk, xv, tk, tv, mk, mv = _chunk_tiles(bos, eos, c, i_h, rt, rk, rv, H, K, V, BT, ADDR64)
        tl.store(dh + ((boh + c) * H + i_h) * K * V + s_off, b_g.to(dh.dtype.element_ty), mask=mkv)
        b_q = tl.load(q + xk + tk, mask=mk, other=0.0)
        b_k = tl.load(k + xk + tk, mask=mk, other=0.0)
        b_w = tl.load(w + xk + tk, mask=mk, other=0.0)
        b_do = tl.load(do + xv + tv, mask=mv, other=0.0)
        # (tril(Q K^T))^T = triu(K Q^T): the intra-chunk term of the pseudo-value gradient.
        b_kq = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
        b_kq = tl.where(upper, b_kq * scale, 0.0)
        if USE_G:  # entry (j, i) decays by exp(G_i - G_j); the state sees exp(G_last - G_j) K
            b_gc, b_gl, n = _chunk_gate(g, bos, eos, c, i_h, rt, H, BT)
            # E^T formed as such (decay with the roles of rows and columns swapped), not as
            # tl.trans(E): no 64x64 layout conversion through shared memory on the sequential path
            b_kq = b_kq * decay(b_gc, b_gc, (rt[:, None] <= rt[None, :]) & (rt < n)[None, :], TRANSPOSE=True)
            b_kd = (b_k * tl.exp(b_gl - b_gc)[:, None]).to(b_k.dtype)
            b_q = (b_q * tl.exp(b_gc)[:, None]).to(b_q.dtype)
        else:
            b_kd = b_k
        b_dv = tl.dot(b_kq.to(b_do.dtype), b_do, input_precision=PREC)
        b_dv += tl.dot(b_kd, b_g.to(b_k.dtype), input_precision=PREC)
        b_dv = b_dv.to(dv.dtype.element_ty)
        tl.store(dv + xv + tv, b_dv, mask=mv)
        if USE_G:
            b_g = b_g * tl.exp(b_gl)
        b_g += scale * tl.dot(tl.trans(b_q), b_do, input_precision=PREC)
        b_g -= tl.dot(tl.trans(b_w), b_dv.to(b_w.dtype), input_precision=PREC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * V + s_off, b_g, mask=mkv)
