"""One decode step of a DeltaNet mixer in one kernel: everything between the input projections
and the output projection, for one token.

Per (sequence, head) program, from the raw projections of the token:

    q, k_j, v_j = act(ShortConv(x))                 conv states shifted in place, new input appended
    q, k_j      = q / |q|, k_j / |k_j|               (or / sum)
    beta_j      = sigmoid(b_j)    (x 2 with negative eigenvalues; 1 without beta)
    S          <- exp(g) S,   g = -exp(A_log) softplus(a + dt_bias)          (gated)
    S          <- S + beta_j k_j (v_j - S^T k_j)^T   for j = 0 .. n_h - 1      (n_h = 1: DeltaNet)
    o           = scale S^T q;   o <- RMSNorm(o) * w  (* SiLU(gate))          (the output norm)

The recurrent state ``[B, H, K, V]`` (fp32) is updated in place. One program holds all of K and
walks V in ``BV``-wide blocks (the columns of S are independent): splitting V across programs,
as the multi-token recurrent kernel does, would make several programs read the q / k conv states
that one of them shifts in place, a race. Each conv state channel belongs to exactly one program;
within it, barriers keep every thread's reads of the old rows ahead of the shifted writes.

The intermediate roundings of the eager layer are reproduced (conv output, normalised q / k and
beta in the input dtype, o in the output dtype before the norm), so both routes agree to
float32 accumulation order.
"""

import triton
import triton.language as tl

from ...pdl import pdl_wait

# qk activation codes (``QK_ACT``) and norm codes (``QK_NORM``), as the launcher passes them
ACT_SILU, ACT_RELU, ACT_ELU, ACT_IDENTITY = 0, 1, 2, 3
NORM_L2, NORM_SUM = 0, 1


@triton.jit
def _round(x, dt: tl.constexpr):
    """``x`` rounded to ``dt`` and back to fp32: the eager layer's tensor in ``dt`` between ops."""
    return x.to(dt).to(tl.float32)


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _short_conv(x, cs, cw, ch, msk, C, mf, W: tl.constexpr, USE_CONV: tl.constexpr, HAS_MASK: tl.constexpr):
    """The conv of one token's channels ``ch`` (fp32, before the activation): ``x`` the token's
    row, ``cs`` this sequence's ``[W-1, C]`` state (shifted in place: the new input goes last),
    ``cw`` the ``[C, W]`` weights. Without a conv: the input itself."""
    b_x = tl.load(x + ch, mask=msk, other=0.0)
    b_y = b_x.to(tl.float32)
    if HAS_MASK and USE_CONV:  # padding: a zero conv input, as in the eager layer (exact in any dtype)
        b_y = b_y * mf
        b_x = b_y.to(b_x.dtype)
    if USE_CONV:
        b_y = b_y * tl.load(cw + ch * W + (W - 1), mask=msk, other=0.0).to(tl.float32)
        rows = ()  # the state's rows as loaded: the shift stores them from registers, no second read
        for s in tl.static_range(W - 1):
            b_c = tl.load(cs + s * C + ch, mask=msk, other=0.0)
            rows = rows + (b_c,)
            b_y += b_c.to(tl.float32) * tl.load(cw + ch * W + s, mask=msk, other=0.0).to(tl.float32)
        if W > 1:
            # shift: every thread has read all the old rows before any thread writes one
            tl.debug_barrier()
            for s in tl.static_range(W - 2):
                tl.store(cs + s * C + ch, rows[s + 1], mask=msk)
            tl.store(cs + (W - 2) * C + ch, b_x, mask=msk)
    return b_y


@triton.jit
def _qk_feature(b_y, msk, dt: tl.constexpr, QK_ACT: tl.constexpr, QK_NORM: tl.constexpr):
    """Activation and norm over the last axis of ``b_y`` (fp32 conv output), with the eager
    layer's roundings to ``dt``."""
    if QK_ACT == 0:
        b_y = _round(_silu(b_y), dt)
    else:
        b_y = _round(b_y, dt)
        if QK_ACT == 1:
            b_y = tl.maximum(b_y, 0.0)
        elif QK_ACT == 2:  # elu + 1, each op rounded
            b_y = _round(_round(tl.where(b_y > 0, b_y, tl.exp(b_y) - 1.0), dt) + 1.0, dt)
    b_y = tl.where(msk, b_y, 0.0)
    if QK_NORM == 0:
        b_y = b_y * (1.0 / tl.sqrt(tl.sum(b_y * b_y, axis=-1, keep_dims=True) + 1e-12))
    else:  # sum norm: the sum is rounded to dt as well
        b_y = _round(b_y / tl.maximum(_round(tl.sum(b_y, axis=-1, keep_dims=True), dt), 1e-6), dt)
    return _round(b_y, dt)


@triton.jit
def _softplus(x):
    """``F.softplus`` (threshold 20) with an accurate ``log1p`` (Goldberg's trick)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def decode_step_kernel(
    q, k, v, cq, ck, cv, wq, wk, wv, b, a, A_log, dt_bias, mask, state, gate, norm_w, o,
    stride_q, stride_k, stride_v, stride_b, stride_a, stride_m, stride_gate, scale, eps,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    NH: tl.constexpr, NHP: tl.constexpr, W: tl.constexpr,
    USE_CONV: tl.constexpr, QK_ACT: tl.constexpr, QK_NORM: tl.constexpr, USE_BETA: tl.constexpr,
    NEG_EIG: tl.constexpr, USE_G: tl.constexpr, HAS_MASK: tl.constexpr, NORM: tl.constexpr,
    USE_GATE: tl.constexpr, PDL: tl.constexpr = False,
):
    """Grid ``(B * H,)``. ``q [B, H*K]``, ``k [B, NH*H*K]``, ``v [B, NH*H*V]`` (row strides
    given), conv states ``[B, W-1, C]`` contiguous, weights ``[C, W]``, ``b [B, NH*H]``,
    ``a [B, H]``, ``mask [B]``, ``state [B, H, K, V]`` fp32, ``gate [B, H*V]``, ``o [B, H, V]``.
    ``PDL``: programmatic dependent launch (``deltanet.ops.pdl``): wait for the previous kernel first."""
    pdl_wait(PDL)
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    dt: tl.constexpr = q.dtype.element_ty
    odt: tl.constexpr = o.dtype.element_ty
    CQ: tl.constexpr = H * K
    CK: tl.constexpr = NH * H * K
    CV: tl.constexpr = NH * H * V
    NV: tl.constexpr = (V + BV - 1) // BV

    rk = tl.arange(0, BK)
    rj = tl.arange(0, NHP)
    mk = rk < K
    mf = 1.0
    if HAS_MASK:
        mf = (tl.load(mask + i_b * stride_m) != 0).to(tl.float32)

    # q [BK] and the n_h keys [NHP, BK] (conv, activation, norm), in fp32 after the roundings
    b_q = _short_conv(q + i_b * stride_q, cq + i_b * (W - 1) * CQ, wq, i_h * K + rk, mk, CQ, mf,
                      W, USE_CONV, HAS_MASK)
    b_q = _qk_feature(b_q, mk, dt, QK_ACT, QK_NORM)
    ch_k = (rj[:, None] * H + i_h) * K + rk[None, :]
    m_k = (rj[:, None] < NH) & mk[None, :]
    b_k = _short_conv(k + i_b * stride_k, ck + i_b * (W - 1) * CK, wk, ch_k, m_k, CK, mf, W, USE_CONV, HAS_MASK)
    b_k = _qk_feature(b_k, m_k, dt, QK_ACT, QK_NORM)
    if HAS_MASK:
        b_k = b_k * mf

    # beta per step [NHP], rounded to the input dtype as the eager layer does
    if USE_BETA:
        b_b = tl.load(b + i_b * stride_b + rj * H + i_h, mask=rj < NH, other=0.0).to(tl.float32)
        b_b = tl.sigmoid(b_b)
        if NEG_EIG:
            b_b = b_b * 2.0
    else:
        b_b = tl.full([NHP], 1.0, tl.float32)
    if HAS_MASK:
        b_b = b_b * mf
    b_b = _round(b_b, dt)
    if USE_G:
        b_a = tl.load(a + i_b * stride_a + i_h).to(tl.float32)
        b_g = -tl.exp(tl.load(A_log + i_h).to(tl.float32)) * _softplus(b_a + tl.load(dt_bias + i_h).to(tl.float32))
        if HAS_MASK:
            b_g = b_g * mf
        b_decay = tl.exp(b_g)

    s_base = state + i_bh.to(tl.int64) * K * V
    o_base = o + i_bh.to(tl.int64) * V
    sumsq = 0.0
    outs = ()  # NV > 1 with the output norm: each block's o (rounded as the eager op's output), kept
    for iv in tl.static_range(NV):
        rv = iv * BV + tl.arange(0, BV)
        mv = rv < V
        mkv = mk[:, None] & mv[None, :]
        p_s = s_base + rk[:, None] * V + rv[None, :]
        b_s = tl.load(p_s, mask=mkv, other=0.0)
        if USE_G:
            b_s = b_s * b_decay
        for j in tl.static_range(NH):
            b_v = _short_conv(v + i_b * stride_v, cv + i_b * (W - 1) * CV, wv, (j * H + i_h) * V + rv, mv, CV, mf,
                              W, USE_CONV, HAS_MASK)
            b_v = _round(_silu(b_v), dt)
            b_kj = tl.sum(tl.where(rj[:, None] == j, b_k, 0.0), 0)
            b_bj = tl.sum(tl.where(rj == j, b_b, 0.0), 0)
            b_w = b_v - tl.sum(b_kj[:, None] * b_s, 0)
            b_s += b_kj[:, None] * (b_bj * b_w)[None, :]
        tl.store(p_s, b_s, mask=mkv)
        b_o = _round(tl.sum(b_q[:, None] * b_s, 0) * scale, odt)
        if NORM and NV == 1:  # the whole row is here: normalise in registers
            rstd = 1.0 / tl.sqrt(tl.sum(tl.where(mv, b_o * b_o, 0.0), 0) / V + eps)
            b_o = b_o * rstd * tl.load(norm_w + rv, mask=mv, other=0.0).to(tl.float32)
            if USE_GATE:
                b_o = b_o * _silu(tl.load(gate + i_b * stride_gate + i_h * V + rv, mask=mv, other=0.0).to(tl.float32))
        elif NORM:
            sumsq += tl.sum(tl.where(mv, b_o * b_o, 0.0), 0)
            outs = outs + (b_o,)
        if not NORM or NV == 1:
            tl.store(o_base + rv, b_o.to(odt), mask=mv)
    if NORM and NV > 1:  # the whole row's sum of squares is known: normalise the kept blocks
        rstd = 1.0 / tl.sqrt(sumsq / V + eps)
        for iv in tl.static_range(NV):
            rv = iv * BV + tl.arange(0, BV)
            mv = rv < V
            b_o = outs[iv] * rstd * tl.load(norm_w + rv, mask=mv, other=0.0).to(tl.float32)
            if USE_GATE:
                b_o = b_o * _silu(tl.load(gate + i_b * stride_gate + i_h * V + rv, mask=mv, other=0.0).to(tl.float32))
            tl.store(o_base + rv, b_o.to(odt), mask=mv)
