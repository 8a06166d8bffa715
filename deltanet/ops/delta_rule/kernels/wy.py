"""UT transform / WY representation of one chunk, forward and backward.

Per chunk of ``BT = 64`` tokens and one head (README.md in the parent folder derives it):

    A  = tril(diag(beta) K K^T, -1)          Ai = (I + A)^-1
    W  = Ai diag(beta) K                     U  = Ai diag(beta) V

Gated (``USE_G``; ``g`` holds G, the within-chunk cumulative log decay, fp32 ``[TT, H]``, which
``wy_fwd_kernel`` writes from the log decays):
``A_ij`` gains the factor ``exp(G_i - G_j)`` and ``W = Ai diag(beta exp(G)) K``; U is unchanged.

Layout: tokens of all sequences packed along one axis, ``k: [TT, H, K]``, ``v: [TT, H, V]``,
``beta: [TT, H]``; ``ai: [TT, H, BT]`` holds row ``t`` of its chunk's ``Ai``. A chunk is row
``chunk_table[i] = (sequence n, chunk c of n)``; rows past the sequence end are masked to zero
(so ``A`` is zero there and ``Ai`` the identity: padded tokens never touch the state).
"""

import triton
import triton.language as tl

from .gate import chunk_cumsum_store, decay, gate_rows, reverse_chunk_sum


@triton.jit
def _chunk_bounds(cu_seqlens, chunk_table, i_t, BT: tl.constexpr):
    """First token of chunk ``i_t`` and the end of its sequence (int64, for large offsets)."""
    i_n = tl.load(chunk_table + 2 * i_t)
    i_c = tl.load(chunk_table + 2 * i_t + 1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return bos + i_c * BT, eos


@triton.jit
def _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H: tl.constexpr, BT: tl.constexpr):
    """``(row, n)``: the int64 index ``t0 * H + i_h`` of the chunk's first (token, head) row,
    and its number of valid tokens (int32, <= BT).

    Kernels add ``row * D`` to their base pointers once (a scalar) and address the tile with
    int32 offsets ``r * (H * D) + c``: per-element int64 offsets of a 64x64 tile cost 64
    registers per thread at 4 warps and were the main cause of the register spills.
    """
    t0, eos = _chunk_bounds(cu_seqlens, chunk_table, i_t, BT)
    return t0 * H + i_h, tl.minimum(eos - t0, BT).to(tl.int32)


@triton.jit
def _load_rows16(k, r, n, ck, H: tl.constexpr, K: tl.constexpr):
    return tl.load(k + r[:, None] * (H * K) + ck[None, :], mask=(r[:, None] < n) & (ck[None, :] < K), other=0.0)


@triton.jit
def _kkt_blocks(k, n, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """The ten lower 16x16 blocks of K K^T for one chunk (rows of K read once per K-block)."""
    r = tl.arange(0, 16)
    a00 = tl.zeros([16, 16], dtype=tl.float32)
    a11, a22, a33 = a00, a00, a00
    a10, a21, a32, a20, a31, a30 = a00, a00, a00, a00, a00, a00
    for k0 in range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        k0_ = _load_rows16(k, r, n, ck, H, K)
        k1_ = _load_rows16(k, r + 16, n, ck, H, K)
        k2_ = _load_rows16(k, r + 32, n, ck, H, K)
        k3_ = _load_rows16(k, r + 48, n, ck, H, K)
        a00 += tl.dot(k0_, tl.trans(k0_), input_precision=PREC)
        a11 += tl.dot(k1_, tl.trans(k1_), input_precision=PREC)
        a22 += tl.dot(k2_, tl.trans(k2_), input_precision=PREC)
        a33 += tl.dot(k3_, tl.trans(k3_), input_precision=PREC)
        a10 += tl.dot(k1_, tl.trans(k0_), input_precision=PREC)
        a21 += tl.dot(k2_, tl.trans(k1_), input_precision=PREC)
        a32 += tl.dot(k3_, tl.trans(k2_), input_precision=PREC)
        a20 += tl.dot(k2_, tl.trans(k0_), input_precision=PREC)
        a31 += tl.dot(k3_, tl.trans(k1_), input_precision=PREC)
        a30 += tl.dot(k3_, tl.trans(k0_), input_precision=PREC)
    return a00, a11, a22, a33, a10, a21, a32, a20, a31, a30


@triton.jit
def _scale_rows(a, beta, g, n, ri, rj, H: tl.constexpr, DIAG: tl.constexpr, USE_G: tl.constexpr):
    """beta scales the rows of A (and exp(G_i - G_j) its entries, gated); diagonal blocks keep
    their strictly lower part."""
    b = tl.load(beta + ri * H, mask=ri < n, other=0.0).to(tl.float32)
    a = a * b[:, None]
    if USE_G:
        a = a * decay(gate_rows(g, ri, n, H), gate_rows(g, rj, n, H),
                      (ri[:, None] > rj[None, :]) & (ri < n)[:, None])
    if DIAG:
        a = tl.where(ri[:, None] > rj[None, :], a, 0.0)
    return a


@triton.jit
def _inv_diag_blocks(ai, n, H: tl.constexpr, BT: tl.constexpr):
    """(I + A_bb)^-1 for the four 16x16 diagonal blocks, which ``ai`` holds (strictly lower A).

    Forward substitution, row i = e_i - sum_{j<i} a[i, j] inv[j, :], with the four blocks
    batched in one [4, 16, 16] tile: one reduction per step for all blocks. Rows of A come
    from the (L1-resident) scratch by a load, not by a masked reduction.
    """
    b = tl.arange(0, 4)
    r = tl.arange(0, 16)
    ri3 = r[None, :, None]
    x = tl.where(ri3 == r[None, None, :], 1.0, 0.0) + tl.zeros([4, 16, 16], dtype=tl.float32)
    for i in range(1, 16):
        row = 16 * b + i  # [4]: row i of each block, within the chunk
        a_i = tl.load(ai + (row[:, None] * (H * BT) + 16 * b[:, None] + r[None, :]),
                      mask=(row < n)[:, None], other=0.0)  # [4, 16]
        x = tl.where(ri3 == i, x - tl.sum(a_i[:, :, None] * x, 1)[:, None, :], x)
    return x


@triton.jit
def _store_diag_blocks(ai, x3, n, H: tl.constexpr, BT: tl.constexpr):
    r = tl.arange(0, 16)
    b4 = tl.arange(0, 4)
    rows3 = 16 * b4[:, None, None] + r[None, :, None]
    tl.store(ai + rows3 * (H * BT) + 16 * b4[:, None, None] + r[None, None, :], x3, mask=rows3 < n)


@triton.jit
def _load_block(ai, n, ri, cj, H: tl.constexpr, BT: tl.constexpr):
    return tl.load(ai + ri[:, None] * (H * BT) + cj[None, :], mask=ri[:, None] < n, other=0.0)


@triton.jit
def _store_block(ai, x, n, ri, cj, H: tl.constexpr, BT: tl.constexpr):
    tl.store(ai + ri[:, None] * (H * BT) + cj[None, :], x.to(ai.dtype.element_ty), mask=ri[:, None] < n)


@triton.jit
def _scaled_product_store(b_x, src, dst, b, mt, rt, H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                          PREC: tl.constexpr):
    """``dst = X diag(beta) src`` for one chunk's ``[BT, D]`` tiles, ``BD`` columns at a time."""
    for d0 in range(0, D, BD):
        cd = d0 + tl.arange(0, BD)
        m = mt[:, None] & (cd[None, :] < D)
        off = rt[:, None] * (H * D) + cd[None, :]
        b_s = tl.load(src + off, mask=m, other=0.0)
        b_d = tl.dot(b_x, (b_s * b[:, None]).to(b_s.dtype), input_precision=PREC)
        tl.store(dst + off, b_d.to(dst.dtype.element_ty), mask=m)


@triton.jit
def wy_fwd_kernel(
    k, v, beta, g, gc, w, u, ai, cu_seqlens, chunk_table,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr = False,
):
    """Grid ``(chunks, H)``. Writes ``ai`` (the chunk's (I + A)^-1), ``w`` and ``u``; gated, first
    ``gc`` (G, fp32) from the log decays ``g``, which every later gated stage reads.

    The four diagonal 16x16 blocks are solved as one [4, 16, 16] tile through the scratch
    (fewer, wider steps than four register tiles, which measured 2.5-4.6% slower in the forward on
    the H200, results/2026-11-30-h200-kernels-tuned-vs-fla.md).
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    k, v, w, u, beta, ai = k + row * K, v + row * V, w + row * K, u + row * V, beta + row, ai + row * BT
    if USE_G:
        # G of this chunk, written before its first use (no launch of its own): read back
        # through memory, so every stage of forward and backward sees the same fp32 values.
        chunk_cumsum_store(g + row, gc + row, n, H, BT)
        tl.debug_barrier()
    g = gc + row  # (a dummy pointer without USE_G)
    r = tl.arange(0, 16)

    # A in 16x16 blocks (lower triangle only): the inverse works block-wise.
    a00, a11, a22, a33, a10, a21, a32, a20, a31, a30 = _kkt_blocks(k, n, H, K, BK, PREC)
    a00 = _scale_rows(a00, beta, g, n, r, r, H, True, USE_G)
    a11 = _scale_rows(a11, beta, g, n, r + 16, r + 16, H, True, USE_G)
    a22 = _scale_rows(a22, beta, g, n, r + 32, r + 32, H, True, USE_G)
    a33 = _scale_rows(a33, beta, g, n, r + 48, r + 48, H, True, USE_G)
    a10 = _scale_rows(a10, beta, g, n, r + 16, r, H, False, USE_G)
    a21 = _scale_rows(a21, beta, g, n, r + 32, r + 16, H, False, USE_G)
    a32 = _scale_rows(a32, beta, g, n, r + 48, r + 32, H, False, USE_G)
    a20 = _scale_rows(a20, beta, g, n, r + 32, r, H, False, USE_G)
    a31 = _scale_rows(a31, beta, g, n, r + 48, r + 16, H, False, USE_G)
    a30 = _scale_rows(a30, beta, g, n, r + 48, r, H, False, USE_G)

    # Diagonal blocks by substitution (through the fp32 scratch ``ai``), then the
    # block-triangular merge X_ij = -X_ii sum_{j<=m<i} A_im X_mj in PREC: full fp32 ("ieee") for
    # fp32 inputs, tf32 for bf16/fp16 ones, whose W, U are rounded to 16 bits anyway (3.5% faster
    # than an fp32 merge; error vs the fp32 oracle +0.06%, results/2026-11-30-h200-kernels-tuned-vs-fla.md).
    _store_block(ai, a00, n, r, r, H, BT)
    _store_block(ai, a11, n, r + 16, r + 16, H, BT)
    _store_block(ai, a22, n, r + 32, r + 32, H, BT)
    _store_block(ai, a33, n, r + 48, r + 48, H, BT)
    # The CTA re-reads what its own threads just wrote: a barrier makes those writes visible.
    tl.debug_barrier()
    x3 = _inv_diag_blocks(ai, n, H, BT)
    tl.debug_barrier()  # all reads of A's diagonal blocks are done before they are overwritten
    _store_diag_blocks(ai, x3, n, H, BT)
    tl.debug_barrier()
    x00 = _load_block(ai, n, r, r, H, BT)
    x11 = _load_block(ai, n, r + 16, r + 16, H, BT)
    x22 = _load_block(ai, n, r + 32, r + 32, H, BT)
    x33 = _load_block(ai, n, r + 48, r + 48, H, BT)
    x10 = -tl.dot(x11, tl.dot(a10, x00, input_precision=PREC), input_precision=PREC)
    x21 = -tl.dot(x22, tl.dot(a21, x11, input_precision=PREC), input_precision=PREC)
    x32 = -tl.dot(x33, tl.dot(a32, x22, input_precision=PREC), input_precision=PREC)
    x20 = -tl.dot(x22, tl.dot(a20, x00, input_precision=PREC)
                  + tl.dot(a21, x10, input_precision=PREC), input_precision=PREC)
    x31 = -tl.dot(x33, tl.dot(a31, x11, input_precision=PREC)
                  + tl.dot(a32, x21, input_precision=PREC), input_precision=PREC)
    x30 = -tl.dot(x33, tl.dot(a30, x00, input_precision=PREC) + tl.dot(a31, x10, input_precision=PREC)
                  + tl.dot(a32, x20, input_precision=PREC), input_precision=PREC)

    z = tl.zeros([16, 16], dtype=tl.float32)
    _store_block(ai, z, n, r, r + 16, H, BT)
    _store_block(ai, z, n, r, r + 32, H, BT)
    _store_block(ai, z, n, r, r + 48, H, BT)
    _store_block(ai, x10, n, r + 16, r, H, BT)
    _store_block(ai, z, n, r + 16, r + 32, H, BT)
    _store_block(ai, z, n, r + 16, r + 48, H, BT)
    _store_block(ai, x20, n, r + 32, r, H, BT)
    _store_block(ai, x21, n, r + 32, r + 16, H, BT)
    _store_block(ai, z, n, r + 32, r + 48, H, BT)
    _store_block(ai, x30, n, r + 48, r, H, BT)
    _store_block(ai, x31, n, r + 48, r + 16, H, BT)
    _store_block(ai, x32, n, r + 48, r + 32, H, BT)

    # W = X diag(bw) K, U = X diag(beta) V (X = (I + A)^-1 in the input dtype; bw = beta, or
    # beta exp(G) gated)
    tl.debug_barrier()  # Ai is read back as one tile, across threads
    rt = tl.arange(0, BT)
    mt = rt < n
    b_ai = tl.load(ai + rt[:, None] * (H * BT) + rt[None, :], mask=mt[:, None], other=0.0).to(k.dtype.element_ty)
    b = tl.load(beta + rt * H, mask=mt, other=0.0).to(tl.float32)
    bw = b * tl.exp(gate_rows(g, rt, n, H)) if USE_G else b
    _scaled_product_store(b_ai, k, w, bw, mt, rt, H, K, BK, PREC)
    _scaled_product_store(b_ai, v, u, b, mt, rt, H, V, BV, PREC)


@triton.jit
def _du_terms(b_v, b_du, dv, off, m, b, b_ail, b_dai, b_db, PREC: tl.constexpr):
    """One V-block of the way back through U = Ai diag(beta) V, given its V and dU tiles: adds
    dU (beta V)^T to dAi and rowsum(Ai^T dU * V) to dbeta, stores dV = beta Ai^T dU."""
    b_dai += tl.dot(b_du, tl.trans((b_v * b[:, None]).to(b_v.dtype)), input_precision=PREC)
    b_dvb = tl.dot(tl.trans(b_ail), b_du, input_precision=PREC)  # d(beta V)
    b_db += tl.sum(b_dvb * b_v.to(tl.float32), 1)
    tl.store(dv + off, (b_dvb * b[:, None]).to(dv.dtype.element_ty), mask=m)
    return b_dai, b_db


@triton.jit
def wy_bwd_kernel(
    k, v, beta, g, ai, dw, du, dk_in, dk, dv, dbeta, dg_part, dg, cu_seqlens, chunk_table, dg_stride,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, USE_G: tl.constexpr = False,
    DG_PARTS: tl.constexpr = 1,
):
    """Grid ``(chunks, H)``. Back through W = Ai diag(beta) K, U = Ai diag(beta) V.

    ``dk_in`` (fp32) holds the key gradient from the output and state terms; this kernel
    adds the WY terms and writes ``dk``, ``dv`` and ``dbeta``. Gated: ``dA`` is taken through
    the factor ``exp(G_i - G_j)`` and ``d(beta K)`` from W gains ``exp(G)`` (README.md); and
    ``dg`` (fp32 ``[TT, H]``): ``2 beta`` times dbeta's W part minus ``k . dk`` (the fp32 dk), plus
    ``dqkw_bwd_kernel``'s ``DG_PARTS`` K-block partial terms (``dg_part``, fp32
    ``[DG_PARTS, TT, H]``, ``dg_stride = TT * H`` apart), summed in reverse within the chunk
    (kernels/gate.py).
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    k, dw, dk_in, dk = k + row * K, dw + row * K, dk_in + row * K, dk + row * K
    v, du, dv = v + row * V, du + row * V, dv + row * V
    ai, beta, dbeta = ai + row * BT, beta + row, dbeta + row
    rt = tl.arange(0, BT)
    mt = rt < n
    b_ai = tl.load(ai + rt[:, None] * (H * BT) + rt[None, :], mask=mt[:, None], other=0.0)
    b_ail = b_ai.to(k.dtype.element_ty)
    b = tl.load(beta + rt * H, mask=mt, other=0.0).to(tl.float32)
    if USE_G:
        b_gc = gate_rows(g + row, rt, n, H)
        b_gam = tl.exp(b_gc)
        bw = b * b_gam
    else:
        bw = b

    b_dai = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    for v0 in tl.static_range(0, V, BV):
        cv = v0 + tl.arange(0, BV)
        m = mt[:, None] & (cv[None, :] < V)
        off = rt[:, None] * (H * V) + cv[None, :]
        b_v = tl.load(v + off, mask=m, other=0.0)
        b_du = tl.load(du + off, mask=m, other=0.0)
        b_dai, b_db = _du_terms(b_v, b_du, dv, off, m, b, b_ail, b_dai, b_db, PREC)
    if USE_G:
        b_dg = tl.zeros([BT], dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        m = mt[:, None] & (ck[None, :] < K)
        off = rt[:, None] * (H * K) + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0)
        b_dw = tl.load(dw + off, mask=m, other=0.0)
        b_dai += tl.dot(b_dw, tl.trans((b_k * bw[:, None]).to(b_k.dtype)), input_precision=PREC)

    # Through the inverse: dA = -Ai^T dAi Ai^T, restricted to A's strictly lower support.
    b_da = tl.dot(b_dai, tl.trans(b_ai), input_precision=PREC)
    b_da = -tl.dot(tl.trans(b_ai), b_da, input_precision=PREC)
    b_da = tl.where(rt[:, None] > rt[None, :], b_da, 0.0)
    if USE_G:  # A = diag(beta) (K K^T * E): the K K^T part sees dA * E
        b_da = b_da * decay(b_gc, b_gc, (rt[:, None] > rt[None, :]) & mt[:, None])

    for k0 in tl.static_range(0, K, BK):
        ck = k0 + tl.arange(0, BK)
        m = mt[:, None] & (ck[None, :] < K)
        off = rt[:, None] * (H * K) + ck[None, :]
        b_k = tl.load(k + off, mask=m, other=0.0)
        b_dw = tl.load(dw + off, mask=m, other=0.0)
        b_kf = b_k.to(tl.float32)
        # d(beta K) from W = Ai (beta K) and from A = (beta K) K^T.
        b_dkb = tl.dot(tl.trans(b_ail), b_dw, input_precision=PREC)
        if USE_G:
            b_dkb = b_dkb * b_gam[:, None]
        b_dkb += tl.dot(b_da, b_kf, input_precision=PREC)
        b_dk = b_dkb * b[:, None] + tl.dot(tl.trans(b_da), b_kf * b[:, None], input_precision=PREC)
        b_dk += tl.load(dk_in + off, mask=m, other=0.0)
        b_dbk = tl.sum(b_dkb * b_kf, 1)  # dbeta's W part (this K-block's)
        b_db += b_dbk
        if USE_G:  # - k . dk + 2 beta (dbeta's W part), from the fp32 tiles before dk is rounded
            b_dg += tl.sum((2.0 * b[:, None] * b_dkb - b_dk) * b_kf, 1)
        tl.store(dk + off, b_dk.to(dk.dtype.element_ty), mask=m)
    tl.store(dbeta + rt * H, b_db.to(dbeta.dtype.element_ty), mask=mt)
    if USE_G:
        p_part = dg_part + row
        for _ in tl.static_range(0, DG_PARTS):  # a fixed order: deterministic
            b_dg += tl.load(p_part + rt * H, mask=mt, other=0.0)
            p_part += dg_stride
        tl.store(dg + row + rt * H, reverse_chunk_sum(b_dg), mask=mt)


@triton.jit
def w_fwd_kernel(
    k, beta, g, w, ai, cu_seqlens, chunk_table,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    USE_G: tl.constexpr = False,
):
    """Grid ``(chunks, H)``: W again from the forward's ``ai`` (the backward's recompute without
    the solve: one product per chunk instead of the whole UT transform; the backward rebuilds the
    states from the forward's ``v_new``, so it needs no U)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    row, n = _chunk_base(cu_seqlens, chunk_table, i_t, i_h, H, BT)
    k, w, beta, ai = k + row * K, w + row * K, beta + row, ai + row * BT
    rt = tl.arange(0, BT)
    mt = rt < n
    b_ai = tl.load(ai + rt[:, None] * (H * BT) + rt[None, :], mask=mt[:, None], other=0.0)
    b = tl.load(beta + rt * H, mask=mt, other=0.0).to(tl.float32)
    bw = b * tl.exp(gate_rows(g + row, rt, n, H)) if USE_G else b
    _scaled_product_store(b_ai.to(k.dtype.element_ty), k, w, bw, mt, rt, H, K, BK, PREC)
