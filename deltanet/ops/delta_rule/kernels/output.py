"""Per-chunk output and its gradients (parallel over chunks).

    O  = scale * (Q S + tril(Q K^T) v_new)                 (S = h[c], the state entering chunk c)

Backward, with ``G = dh[c]`` the state gradient after the chunk and ``dv`` the pseudo-value
gradient from the reverse recurrence:

    dP = scale * tril(dO v_new^T)
    dQ = scale * dO S^T + dP K
    dK = dP^T Q + v_new G^T                 (the WY terms are added by ``wy_bwd_kernel``)
    dW = -dv S^T

Gated (``USE_G``, G the within-chunk cumulative log decay, E_ij = exp(G_i - G_j)): the Q S
term gains exp(G_i) and tril(Q K^T) the factor E; in the backward dP gains E, the ``dO S^T``
part of dQ exp(G_i), the ``v_new G^T`` part of dK exp(G_last - G_i) (``kernels/gate.py``), and the
kernel writes the ``q . dq`` and chunk-end terms of dg.
"""

import triton
import triton.language as tl

from .gate import decay, gate_chunk_grads, gate_rows
from .wy import _chunk_base


@triton.jit
def o_fwd_kernel(
    q, k, v_new, g, h, o, cu_seqlens, chunk_table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(V, BV), chunks, H)``."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    q, k, v_new, o = q + row * K, k + row * K, v_new + row * V, o + row * V
    h = h + (i_t.to(tl.int64) * H + i_h) * K * V
    rt = tl.arange(0, BT)
    mt = rt < n
    rv = i_v * BV + tl.arange(0, BV)
    mv = mt[:, None] & (rv[None, :] < V)

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_a = tl.zeros([BT, BT], dtype=tl.float32)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        mk = mt[:, None] & (ck[None, :] < K)
        b_q = tl.load(q + rt[:, None] * (H * K) + ck[None, :], mask=mk, other=0.0)
        b_k = tl.load(k + rt[:, None] * (H * K) + ck[None, :], mask=mk, other=0.0)
        b_h = tl.load(h + ck[:, None] * V + rv[None, :], mask=(ck[:, None] < K) & (rv[None, :] < V), other=0.0)
        b_o += tl.dot(b_q, b_h, input_precision=PREC)
        b_a += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    b_a = tl.where(rt[:, None] >= rt[None, :], b_a, 0.0)
    if USE_G:
        b_gc = gate_rows(g + row, rt, n, H)
        b_o = b_o * tl.exp(b_gc)[:, None]
        b_a = b_a * decay(b_gc, b_gc, (rt[:, None] >= rt[None, :]) & mt[:, None])
    off = rt[:, None] * (H * V) + rv[None, :]
    b_vn = tl.load(v_new + off, mask=mv, other=0.0)
    b_o += tl.dot(b_a.to(b_vn.dtype), b_vn, input_precision=PREC)
    tl.store(o + off, (b_o * scale).to(o.dtype.element_ty), mask=mv)


@triton.jit
def _state_grads_block(do, v_new, du, h, dh, rt, mt, ck, v0, b_dq, b_dk, b_dw, b_dp, H: tl.constexpr,
                       K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """The V-block ``[v0, v0 + BV)`` of one chunk's dQ (``dO S^T``), dK (``v_new G^T``), dW
    (``-dU S^T``) and dP (``dO v_new^T``) sums. Returns them and, for the caller's own use of the
    block, its dU tile, offsets and mask."""
    cv = v0 + tl.arange(0, BV)
    mv = mt[:, None] & (cv[None, :] < V)
    off = rt[:, None] * (H * V) + cv[None, :]
    b_do = tl.load(do + off, mask=mv, other=0.0)
    b_vn = tl.load(v_new + off, mask=mv, other=0.0)
    b_du = tl.load(du + off, mask=mv, other=0.0)
    # [BV, BK] tiles of S and G, loaded transposed.
    s_off = ck[None, :] * V + cv[:, None]
    ms = (ck[None, :] < K) & (cv[:, None] < V)
    b_ht = tl.load(h + s_off, mask=ms, other=0.0)
    b_dht = tl.load(dh + s_off, mask=ms, other=0.0)
    b_dq += tl.dot(b_do, b_ht, input_precision=PREC)
    b_dk += tl.dot(b_vn, b_dht, input_precision=PREC)
    b_dw -= tl.dot(b_du, b_ht, input_precision=PREC)
    b_dp += tl.dot(b_do, tl.trans(b_vn), input_precision=PREC)
    return b_dq, b_dk, b_dw, b_dp, b_du, off, mv


@triton.jit
def _tile_dot(x, y, ck, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``sum(x * y)`` over the rows ``ck`` of two ``[K, V]`` states (any dtypes), in fp32."""
    b_s = tl.zeros([BK], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        off = ck[None, :] * V + cv[:, None]
        m = (ck[None, :] < K) & (cv[:, None] < V)
        b_x = tl.load(x + off, mask=m, other=0.0).to(tl.float32)
        b_y = tl.load(y + off, mask=m, other=0.0).to(tl.float32)
        b_s += tl.sum(b_x * b_y, 0)
    return tl.sum(b_s, 0)


@triton.jit
def state_term(h, dh, ck, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """``<h[c], dh[c]>`` over the K columns ``ck`` (``h``, ``dh`` point at chunk c's states: the state
    entering the chunk and the gradient of the state leaving it), fp32 products and sum: with
    ``exp(G_C)`` and ``sum_j k_j . dk_j`` over the state part of dK it is the chunk-end term of dg
    (kernels/gate.py).

    Its own short loop before the gradient kernels' main V loop, while their accumulators are still
    empty (the same tiles are read again by the main loop): accumulated inside that loop instead it
    spilled twice as much in the fused kernel (736 vs 368 B per thread, sm_90, D = 64, bf16)."""
    return _tile_dot(h, dh, ck, K, V, BK, BV)


@triton.jit
def dqkw_bwd_kernel(
    q, k, v_new, g, h, dh, do, dv, dq, dk, dw, dg_part, cu_seqlens, chunk_table, scale, dg_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(cdiv(K, BK), chunks, H)``. Writes ``dq`` (final), ``dk`` (fp32, partial) and ``dw``.
    Gated: also this K-block's part of the per-token terms of dg (``dg_part[i_k]``, fp32 ``[TT, H]``,
    ``dg_stride = TT * H`` apart): ``q . dq`` over its columns, plus its share of the chunk-end term
    (``exp(G_C) <h[c], dh[c]> + sum_j k_j . dk_j`` over dk's state part) at the chunk's last token;
    ``wy_bwd_kernel`` sums the parts and finishes dg."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    q, k, dq, dk, dw = q + row * K, k + row * K, dq + row * K, dk + row * K, dw + row * K
    v_new, do, dv = v_new + row * V, do + row * V, dv + row * V
    s_base = (i_t.to(tl.int64) * H + i_h) * K * V
    h, dh = h + s_base, dh + s_base
    rt = tl.arange(0, BT)
    mt = rt < n
    ck = i_k * BK + tl.arange(0, BK)
    mk = mt[:, None] & (ck[None, :] < K)

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    if USE_G:
        b_st = state_term(h, dh, ck, K, V, BK, BV)
    # A runtime loop, not static_range: unrolled, the compiler hoists the next blocks' loads and
    # spills at V = 256 (912 B per thread at 8 warps).
    for v0 in range(0, V, BV):
        b_dq, b_dk, b_dw, b_dp, _, _, _ = _state_grads_block(
            do, v_new, dv, h, dh, rt, mt, ck, v0, b_dq, b_dk, b_dw, b_dp, H, K, V, BV, PREC)
    off = rt[:, None] * (H * K) + ck[None, :]
    b_q = tl.load(q + off, mask=mk, other=0.0)
    b_k = tl.load(k + off, mask=mk, other=0.0)
    if USE_G:
        b_dq, b_dk, b_dp, _, b_gam = gate_chunk_grads(g + row, rt, n, b_dq, b_dk, b_dp, H)
        # this K-block's share of the chunk-end term: exp(G_C) <h[c], dh[c]> + sum_j k_j . dk_j,
        # dk here its state part
        b_end = tl.sum(tl.where(rt == n - 1, b_gam, 0.0), 0) * b_st
        b_end += tl.sum(tl.sum(b_dk * b_k.to(tl.float32), 1), 0)
    b_dp = tl.where(rt[:, None] >= rt[None, :], b_dp * scale, 0.0)
    b_dq = b_dq * scale + tl.dot(b_dp.to(b_k.dtype), b_k, input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dp).to(b_q.dtype), b_q, input_precision=PREC)
    tl.store(dq + off, b_dq.to(dq.dtype.element_ty), mask=mk)
    tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=mk)
    tl.store(dw + off, b_dw.to(dw.dtype.element_ty), mask=mk)
    if USE_G:  # q . dq from the fp32 tile, before dq is rounded to the input dtype
        b_t = tl.sum(b_dq * b_q.to(tl.float32), 1) + tl.where(rt == n - 1, b_end, 0.0)
        tl.store(dg_part + i_k.to(tl.int64) * dg_stride + row + rt * H, b_t, mask=mt)
