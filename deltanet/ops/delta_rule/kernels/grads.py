"""All of one chunk's input gradients in one pass: ``dqkw_bwd_kernel`` and ``wy_bwd_kernel``
fused (kernels/output.py and kernels/wy.py derive the two halves).

With ``S = h[c]``, ``G = dh[c]``, ``dU = dv`` (the pseudo-value gradient of the reverse
recurrence; ``v_new = U - W S``, so it is also U's gradient), ``Kb = diag(beta) K`` and
``Vb = diag(beta) V``:

    dP  = scale * tril(dO v_new^T)
    dQ  = scale * dO S^T + dP K
    dW  = -dU S^T
    dAi = dU Vb^T + dW Kb^T                   dA = -Ai^T dAi Ai^T   (strictly lower)
    dV  = diag(beta) Ai^T dU                  dKb = Ai^T dW + dA K
    dK  = v_new G^T + dP^T Q + diag(beta) dKb + dA^T Kb
    dbeta = rowsum(Ai^T dU * V) + rowsum(dKb * K)

Split in two kernels, ``dW`` (bf16) and the first two terms of ``dK`` (fp32) go through memory
and K, dU, Ai are read twice; here they stay in registers. One program holds all of K
(``BK >= K``, so K <= 128 at 8 warps) and walks V in blocks.

Gated (``USE_G``): the decay factors of ``gate_chunk_grads`` (kernels/gate.py) on dQ, dK and
dP; ``Kb = diag(beta exp(G)) K`` in the W terms (``dKb`` gains exp(G)); dA is taken through E.
And dg, finished here (kernels/gate.py): ``q . dq`` from the fp32 dQ tile, ``- k . dk`` from the
fp32 dK tile, ``2 beta`` times dbeta's W part, at the last token ``exp(G_C) <h[c], dh[c]>`` (from
``state_term``, kernels/output.py) plus the sum of ``k . dk`` over the state part of dK, then the
reverse sum within the chunk. dq and dk are stored in the input dtype.
"""

import triton
import triton.language as tl

from .gate import decay, gate_chunk_grads, reverse_chunk_sum
from .output import _state_grads_block, state_term
from .wy import _chunk_base, _du_terms


@triton.jit
def chunk_grads_kernel(
    q, k, v, beta, g, ai, v_new, h, dh, do, du, dq, dk, dv, dbeta, dg, cu_seqlens, chunk_table, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(chunks, H)``. Writes ``dq``, ``dk``, ``dv`` and ``dbeta`` (all final); gated, ``dg``
    (fp32 ``[TT, H]``)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    q, k, dq, dk = q + row * K, k + row * K, dq + row * K, dk + row * K
    v, v_new, do, du, dv = v + row * V, v_new + row * V, do + row * V, du + row * V, dv + row * V
    ai, beta, dbeta = ai + row * BT, beta + row, dbeta + row
    s_base = (i_t.to(tl.int64) * H + i_h) * K * V
    h, dh = h + s_base, dh + s_base
    rt = tl.arange(0, BT)
    mt = rt < n
    ck = tl.arange(0, BK)
    mk = mt[:, None] & (ck[None, :] < K)
    b = tl.load(beta + rt * H, mask=mt, other=0.0).to(tl.float32)
    p_ai = ai + rt[:, None] * (H * BT) + rt[None, :]
    b_ail = tl.load(p_ai, mask=mt[:, None], other=0.0).to(k.dtype.element_ty)

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dp = tl.zeros([BT, BT], dtype=tl.float32)
    b_dai = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    if USE_G:
        b_st = state_term(h, dh, ck, K, V, BK, BV)
    # A runtime loop: unrolled, the next blocks' loads are hoisted and spill (as in dqkw_bwd).
    for v0 in range(0, V, BV):
        b_dq, b_dk, b_dw, b_dp, b_du, off, mv = _state_grads_block(
            do, v_new, du, h, dh, rt, mt, ck, v0, b_dq, b_dk, b_dw, b_dp, H, K, V, BV, PREC)
        b_v = tl.load(v + off, mask=mv, other=0.0)
        b_dai, b_db = _du_terms(b_v, b_du, dv, off, mv, b, b_ail, b_dai, b_db, PREC)

    off = rt[:, None] * (H * K) + ck[None, :]
    b_q = tl.load(q + off, mask=mk, other=0.0)
    b_k = tl.load(k + off, mask=mk, other=0.0)
    if USE_G:
        b_dq, b_dk, b_dp, b_gc, b_gam = gate_chunk_grads(g + row, rt, n, b_dq, b_dk, b_dp, H)
        bw = b * b_gam
        # the chunk-end term: exp(G_C) <h[c], dh[c]> + sum_j k_j . dk_j, dk here its state part
        b_end = tl.sum(tl.where(rt == n - 1, b_gam, 0.0), 0) * b_st
        b_end += tl.sum(tl.sum(b_dk * tl.load(k + off, mask=mk, other=0.0).to(tl.float32), 1), 0)
    else:
        bw = b
    b_dp = tl.where(rt[:, None] >= rt[None, :], b_dp * scale, 0.0)
    b_dq = b_dq * scale + tl.dot(b_dp.to(b_k.dtype), b_k, input_precision=PREC)
    tl.store(dq + off, b_dq.to(dq.dtype.element_ty), mask=mk)
    if USE_G:  # q . dq from the fp32 tile, before dq is rounded
        b_dg = tl.sum(b_dq * b_q.to(tl.float32), 1) + tl.where(rt == n - 1, b_end, 0.0)
    b_dk += tl.dot(tl.trans(b_dp).to(b_q.dtype), b_q, input_precision=PREC)

    # The WY half. dW is rounded to the input dtype, as the two-kernel path stores it.
    b_dwl = b_dw.to(b_k.dtype)
    b_dai += tl.dot(b_dwl, tl.trans((b_k * bw[:, None]).to(b_k.dtype)), input_precision=PREC)
    b_ai = tl.load(p_ai, mask=mt[:, None], other=0.0)
    b_da = tl.dot(b_dai, tl.trans(b_ai), input_precision=PREC)
    b_da = -tl.dot(tl.trans(b_ai), b_da, input_precision=PREC)
    b_da = tl.where(rt[:, None] > rt[None, :], b_da, 0.0)
    if USE_G:
        # k again from memory (L1/L2), not b_k.to(fp32): that conversion is also taken for dg's
        # k . dk_state above, and sharing it kept an fp32 copy of K live across the dQ stage (sm_90,
        # D = 64, bf16: 848 against 568 B per thread of spills)
        b_kf = tl.load(k + off, mask=mk, other=0.0).to(tl.float32)
    else:
        b_kf = b_k.to(tl.float32)
    b_dkb = tl.dot(tl.trans(b_ail), b_dwl, input_precision=PREC)
    if USE_G:
        b_da = b_da * decay(b_gc, b_gc, (rt[:, None] > rt[None, :]) & mt[:, None])
        b_dkb = b_dkb * b_gam[:, None]
    b_dkb += tl.dot(b_da, b_kf, input_precision=PREC)
    b_dk += b_dkb * b[:, None] + tl.dot(tl.trans(b_da), b_kf * b[:, None], input_precision=PREC)
    b_dbk = tl.sum(b_dkb * b_kf, 1)  # dbeta's W part
    b_db += b_dbk
    if USE_G:  # - k . dk + 2 beta (dbeta's W part), from the fp32 tiles before dk is rounded
        b_dg += tl.sum((2.0 * b[:, None] * b_dkb - b_dk) * b_kf, 1)
        tl.store(dg + row + rt * H, reverse_chunk_sum(b_dg), mask=mt)
    tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=mk)
    tl.store(dbeta + rt * H, b_db.to(dbeta.dtype.element_ty), mask=mt)
