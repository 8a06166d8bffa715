"""Fused recurrent delta rule: one token at a time, the state in registers (the decode path).

    w_t = v_t - S^T k_t        S <- S + beta_t k_t w_t^T        o_t = scale * S^T q_t

One program per (sequence, head, V-block): the columns of S are independent, so V splits
across programs while each holds all of K. Backward is two passes over the sequence:

* reverse (``recurrent_bwd_rev_kernel``): G, the gradient w.r.t. the state after step t,
  G += scale q do^T; dk += G u (u = beta w); du = G^T k; dv = beta du; dbeta = du . w;
  G -= beta k du^T; writes du;
* forward (``recurrent_bwd_fwd_kernel``): recomputes the state and adds the terms that need
  it: dk -= beta S_{t-1} du, dq = scale S_t do.

``w`` (fp32, one V-vector per token, written by the forward when gradients are needed) keeps
the backward exact for beta = 0 (no division by beta). Per-V-block partial sums of dq, dk and
dbeta are reduced on the host.

Gated (``USE_G``): each step first decays the state, ``S <- exp(g_t) S``; the reverse pass
carries ``G <- exp(g_t) (G - beta k du^T)`` and the forward pass of the backward uses the decayed
state in the dk term. dg is not formed here (``gate.gate_grad``).
"""

import triton
import triton.language as tl


@triton.jit
def _program(cu_seqlens, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
             BV: tl.constexpr):
    """This program's ``(i_v, i_h, bos, eos, rk, rv, mk, mv, mkv, s_off)``: V-block, head, token
    range, K / V lanes and masks, and the offset of its ``[BK, BV]`` slice of a ``[N, H, K, V]`` state."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    rk = tl.arange(0, BK)
    rv = i_v * BV + tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    mkv = mk[:, None] & mv[None, :]
    s_off = i_nh.to(tl.int64) * K * V + rk[:, None] * V + rv[None, :]
    return i_v, i_h, bos, eos, rk, rv, mk, mv, mkv, s_off


@triton.jit
def recurrent_fwd_kernel(
    q, k, v, beta, g, o, w, h0, ht, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_HT: tl.constexpr, STORE_W: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(V, BV), N * H)``."""
    i_v, i_h, bos, eos, rk, rv, mk, mv, mkv, s_off = _program(cu_seqlens, H, K, V, BK, BV)

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_s += tl.load(h0 + s_off, mask=mkv, other=0.0)
    for t in range(bos, eos):
        b_k = tl.load(k + (t * H + i_h) * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_q = tl.load(q + (t * H + i_h) * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (t * H + i_h) * V + rv, mask=mv, other=0.0).to(tl.float32)
        b_b = tl.load(beta + t * H + i_h).to(tl.float32)
        if USE_G:
            b_s = b_s * tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        b_w = b_v - tl.sum(b_k[:, None] * b_s, 0)
        if STORE_W:
            tl.store(w + (t * H + i_h) * V + rv, b_w, mask=mv)
        b_s += b_k[:, None] * (b_b * b_w)[None, :]
        b_o = tl.sum(b_q[:, None] * b_s, 0) * scale
        tl.store(o + (t * H + i_h) * V + rv, b_o.to(o.dtype.element_ty), mask=mv)
    if STORE_HT:
        tl.store(ht + s_off, b_s, mask=mkv)


@triton.jit
def recurrent_bwd_rev_kernel(
    q, k, beta, g, w, do, dht, du, dv, dk_part, db_part, dh0, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    TT, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(V, BV), N * H)``. ``dk_part: [NV, TT, H, K]``, ``db_part: [NV, TT, H]``."""
    i_v, i_h, bos, eos, rk, rv, mk, mv, mkv, s_off = _program(cu_seqlens, H, K, V, BK, BV)
    part = i_v.to(tl.int64) * TT * H

    b_g = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_g += tl.load(dht + s_off, mask=mkv, other=0.0)
    for i in range(bos, eos):
        t = bos + eos - 1 - i
        b_k = tl.load(k + (t * H + i_h) * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_q = tl.load(q + (t * H + i_h) * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_do = tl.load(do + (t * H + i_h) * V + rv, mask=mv, other=0.0).to(tl.float32)
        b_w = tl.load(w + (t * H + i_h) * V + rv, mask=mv, other=0.0)
        b_b = tl.load(beta + t * H + i_h).to(tl.float32)
        b_g += scale * b_q[:, None] * b_do[None, :]
        b_dk = tl.sum(b_g * (b_b * b_w)[None, :], 1)
        b_du = tl.sum(b_g * b_k[:, None], 0)
        tl.store(du + (t * H + i_h) * V + rv, b_du, mask=mv)
        tl.store(dv + (t * H + i_h) * V + rv, (b_b * b_du).to(dv.dtype.element_ty), mask=mv)
        tl.store(dk_part + (part + t * H + i_h) * K + rk, b_dk, mask=mk)
        tl.store(db_part + part + t * H + i_h, tl.sum(b_du * b_w, 0))
        b_g -= b_b * b_k[:, None] * b_du[None, :]
        if USE_G:
            b_g = b_g * tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
    if STORE_DH0:
        tl.store(dh0 + s_off, b_g, mask=mkv)


@triton.jit
def recurrent_bwd_fwd_kernel(
    k, beta, g, w, do, du, h0, dk_part, dq_part, cu_seqlens, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    TT, USE_H0: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(V, BV), N * H)``. Adds ``-beta S_{t-1} du`` to ``dk_part``, writes ``dq_part``."""
    i_v, i_h, bos, eos, rk, rv, mk, mv, mkv, s_off = _program(cu_seqlens, H, K, V, BK, BV)
    part = i_v.to(tl.int64) * TT * H

    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_s += tl.load(h0 + s_off, mask=mkv, other=0.0)
    for t in range(bos, eos):
        b_k = tl.load(k + (t * H + i_h) * K + rk, mask=mk, other=0.0).to(tl.float32)
        b_do = tl.load(do + (t * H + i_h) * V + rv, mask=mv, other=0.0).to(tl.float32)
        b_w = tl.load(w + (t * H + i_h) * V + rv, mask=mv, other=0.0)
        b_du = tl.load(du + (t * H + i_h) * V + rv, mask=mv, other=0.0)
        b_b = tl.load(beta + t * H + i_h).to(tl.float32)
        if USE_G:
            b_s = b_s * tl.exp(tl.load(g + t * H + i_h).to(tl.float32))
        p_dk = dk_part + (part + t * H + i_h) * K + rk
        tl.store(p_dk, tl.load(p_dk, mask=mk, other=0.0) - b_b * tl.sum(b_s * b_du[None, :], 1), mask=mk)
        b_s += b_k[:, None] * (b_b * b_w)[None, :]
        tl.store(dq_part + (part + t * H + i_h) * K + rk, scale * tl.sum(b_s * b_do[None, :], 1), mask=mk)
