"""Backward through the UT transform in two passes (fewer live tiles than ``wy_bwd_kernel``).

With ``Kb = diag(beta) K``, ``Vb = diag(beta) V``, ``W = Ai Kb``, ``U = Ai Vb``,
``A = tril(Kb K^T, -1)`` and ``Ai = (I + A)^-1``:

    pass 1 (``wy_bwd_da_kernel``):  dAi = dU Vb^T + dW Kb^T,  dA = -Ai^T dAi Ai^T (strictly lower),
                                    dV = diag(beta) Ai^T dU,  dbeta_V = rowsum(Ai^T dU * V)
    pass 2 (``wy_bwd_dk_kernel``):  dKb = Ai^T dW + dA K,     dK = diag(beta) dKb + dA^T Kb + dk_in,
                                    dbeta = dbeta_V + rowsum(dKb * K)

The single kernel keeps Ai, dAi, dA and the per-block products live at once (2.3 KB of spill
per thread at D = 128, 4 warps); split, each pass holds at most two 64x64 fp32 tiles. ``dA``
goes through an fp32 scratch [tokens, H, 64] (the same size as ``ai``).
"""

import triton
import triton.language as tl

from .wy import _chunk_base, _du_terms


@triton.jit
def wy_bwd_da_kernel(
    k, v, beta, ai, dw, du, dv, da, db, cu_seqlens, chunk_table,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(chunks, H)``. Writes ``dv``, ``da`` (fp32 scratch) and ``db`` (fp32, V part)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    k, dw = k + row * K, dw + row * K
    v, du, dv = v + row * V, du + row * V, dv + row * V
    ai, da, beta, db = ai + row * BT, da + row * BT, beta + row, db + row
    rt = tl.arange(0, BT)
    mt = rt < n
    b = tl.load(beta + rt * H, mask=mt, other=0.0).to(tl.float32)
    b_ail = tl.load(ai + rt[:, None] * (H * BT) + rt[None, :], mask=mt[:, None], other=0.0).to(k.dtype.element_ty)

    b_dai = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        m = mt[:, None] & (cv[None, :] < V)
        off = rt[:, None] * (H * V) + cv[None, :]
        b_v = tl.load(v + off, mask=m, other=0.0)
        b_du = tl.load(du + off, mask=m, other=0.0)
        b_dai, b_db = _du_terms(b_v, b_du, dv, off, m, b, b_ail, b_dai, b_db, PREC)
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        m = mt[:, None] & (ck[None, :] < K)
        off = rt[:, None] * (H * K) + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0)
        b_dw = tl.load(dw + off, mask=m, other=0.0)
        b_dai += tl.dot(b_dw, tl.trans((b_k * b[:, None]).to(b_k.dtype)), input_precision=PREC)

    # dA = -Ai^T dAi Ai^T on A's strictly lower support; Ai re-read in fp32 (not kept live above).
    b_ai = tl.load(ai + rt[:, None] * (H * BT) + rt[None, :], mask=mt[:, None], other=0.0)
    b_da = tl.dot(b_dai, tl.trans(b_ai), input_precision=PREC)
    b_da = -tl.dot(tl.trans(b_ai), b_da, input_precision=PREC)
    b_da = tl.where(rt[:, None] > rt[None, :], b_da, 0.0)
    tl.store(da + rt[:, None] * (H * BT) + rt[None, :], b_da, mask=mt[:, None])
    tl.store(db + rt * H, b_db, mask=mt)


@triton.jit
def wy_bwd_dk_kernel(
    k, beta, ai, dw, da, db, dk_in, dk, dbeta, db_stride, cu_seqlens, chunk_table,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):
    """Grid ``(cdiv(K, BK), chunks, H)``. K-block ``i`` writes its part of ``dbeta`` at
    ``dbeta + i * db_stride`` (block 0 adds the V part ``db``): with one K-block that is the
    final ``dbeta``; with several, the launcher sums the fp32 partials."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    k, dw, dk_in, dk = k + row * K, dw + row * K, dk_in + row * K, dk + row * K
    ai, da, beta, db = ai + row * BT, da + row * BT, beta + row, db + row
    dbeta = dbeta + i_k.to(tl.int64) * db_stride + row
    rt = tl.arange(0, BT)
    mt = rt < n
    b = tl.load(beta + rt * H, mask=mt, other=0.0).to(tl.float32)
    p_t = rt[:, None] * (H * BT) + rt[None, :]
    b_ail = tl.load(ai + p_t, mask=mt[:, None], other=0.0).to(k.dtype.element_ty)
    b_da = tl.load(da + p_t, mask=mt[:, None], other=0.0)
    ck = i_k * BK + tl.arange(0, BK)
    m = mt[:, None] & (ck[None, :] < K)
    off = rt[:, None] * (H * K) + ck[None, :]
    b_k = tl.load(k + off, mask=m, other=0.0)
    b_dw = tl.load(dw + off, mask=m, other=0.0)
    b_kf = b_k.to(tl.float32)
    # d(beta K) from W = Ai (beta K) and from A = (beta K) K^T.
    b_dkb = tl.dot(tl.trans(b_ail), b_dw, input_precision=PREC)
    b_dkb += tl.dot(b_da, b_kf, input_precision=PREC)
    b_dk = b_dkb * b[:, None] + tl.dot(tl.trans(b_da), b_kf * b[:, None], input_precision=PREC)
    b_dk += tl.load(dk_in + off, mask=m, other=0.0)
    tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=m)
    b_db = tl.load(db + rt * H, mask=mt & (i_k == 0), other=0.0) + tl.sum(b_dkb * b_kf, 1)
    tl.store(dbeta + rt * H, b_db.to(dbeta.dtype.element_ty), mask=mt)
