"""Causal depthwise short convolution in Triton: one pass over memory forward, one backward.

Computes what ``deltanet.layers.conv._padded_conv`` computes (``causal_conv`` after ``W - 1``
zeros, the reference the tests check against)::

    y_t = act(z_t),   z_t = sum_{s=0}^{W-1} w[:, W-1-s] * x_{t-s}   (x_{t-s} = 0 for t < s)

for ``x: [B, T, C]``, ``w: [C, W]``, ``act`` SiLU or the identity; with ``doc_pos`` (positions
inside documents of a packed batch, ``[T]``) the term ``x_{t-s}`` is dropped when
``doc_pos[t] < s``. Accumulation in float32, ``y`` in ``x.dtype``.

Forward (``short_conv_fwd_kernel``, programs over (B x T-blocks, C-blocks)): the ``W`` shifted
``[BT, BC]`` input tiles (all but one row of each come from L1/L2), SiLU, one store.

Backward (``short_conv_bwd_kernel``, same programs): with ``dz_t = dy_t act'(z_t)``,

    dx_t        = sum_s w[:, W-1-s] * dz_{t+s}     (term dropped when doc_pos[t+s] < s)
    dw[:, W-1-s] = sum_{b, t} dz_t * x_{t-s}        (same masks)

A program walks its rows in time order, keeping the last ``W - 1`` inputs and the ``W - 1``
unfinished ``dx`` rows in registers: ``dz_t`` is computed once and scattered to
``dx_{t-W+1..t}``. (Recomputing ``dz_{t+s}`` from shifted tiles instead would cost ``W``
sigmoids per element, two special-function instructions each: by our count about 1.5x the
time of the kernel's memory traffic on an H200, not measured.) Only ``x``, ``w`` and
``doc_pos`` are kept for backward; each program writes fp32 partial sums of ``dw``
(``[B x T-blocks, C, W]``), reduced by a ``sum(0)`` afterwards: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# interpreted(): whether the kernels run under TRITON_INTERPRET=1; importing the module applies
# the interpreter fixes (tensor-valued loop bounds, boolean masks), which these kernels need too
from .delta_rule.interpreter import interpreted
from .registry import register_autograd_op

__all__ = ["short_conv", "short_conv_bwd", "short_conv_fwd"]

MAX_W = 8  # the kernels unroll over the taps; 8 keeps the backward's register window small
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch settings: fixed (no autotuning, so a cold start compiles each kernel once per W).
# Forward: [BT, BC] tiles. Backward: BT rows per program, walked R rows per step (the R rows'
# loads are issued together, so that each program keeps several rows of x and dy in flight);
# BWD_DOCS with doc_pos (its masks take registers: fewer channels, more rows in flight).
# The fastest of benchmarks/bench_conv.py --sweep on an H200 (2026-11-30) at [16, 2048, 1024]
# bf16, W = 4: forward 0.055 ms, backward 0.083 ms (0.107 ms with documents), where a copy of x
# takes 0.036 ms; tiles of 32+ rows in the forward (more registers, fewer programs per SM) and
# R = 8 without documents (spills) were slower.
FWD = dict(BT=16, BC=128, num_warps=2)
BWD = dict(BT=128, BC=256, R=4, num_warps=2)
BWD_DOCS = dict(BT=256, BC=128, R=8, num_warps=2)

# Tests set this: every buffer the launchers allocate starts as NaN, so that an element a
# kernel forgets to write shows up in the result instead of passing as stale memory.
POISON = False


@triton.jit
def short_conv_fwd_kernel(x, w, doc_pos, y, T, C, NT, stride_xb, stride_xt,
                          W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                          SILU: tl.constexpr, HAS_DOC: tl.constexpr):
    i_bt, i_c = tl.program_id(0), tl.program_id(1)
    i_b, i_t = i_bt // NT, i_bt % NT
    t0 = i_t * BT
    r = tl.arange(0, BT)  # rows relative to t0: 32-bit offsets from a 64-bit base
    o_t = t0 + r
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < C
    x += i_b.to(tl.int64) * stride_xb + t0.to(tl.int64) * stride_xt
    y += (i_b.to(tl.int64) * T + t0) * C
    if HAS_DOC:
        pos = tl.load(doc_pos + o_t, mask=m_t, other=0)
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        m = m_t & (o_t >= s)
        if HAS_DOC and s > 0:
            m = m & (pos >= s)  # x_{t-s} belongs to an earlier document
        b_x = tl.load(x + (r - s)[:, None] * stride_xt + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.)
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.).to(tl.float32)
        acc += b_x.to(tl.float32) * b_w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y + r[:, None] * C + o_c[None, :], acc.to(y.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _bwd_row(t, b_x, b_dy, b_p, dx, C, t0, t1, o_c, m_c, ws, xs, pend, dws,
             W: tl.constexpr, SILU: tl.constexpr, HAS_DOC: tl.constexpr, ACC_DW: tl.constexpr):
    """Row ``t`` of the backward walk. ``xs[k] = x_{t-1-k}`` and ``pend[k]`` = the sum so far of
    ``dx_{t-1-k}`` (k < W - 1); stores the finished ``dx_{t-W+1}``; returns the shifted windows."""
    # xm[s] = x_{t-s} where it takes part (doc mask), wm[s] = its tap where it does, else 0
    xm = (b_x,)
    wm = (ws[W - 1],)
    for s in tl.static_range(1, W):
        if HAS_DOC:
            xm = xm + (tl.where(b_p >= s, xs[s - 1], 0.),)
            wm = wm + (tl.where(b_p >= s, ws[W - 1 - s], 0.),)
        else:
            xm = xm + (xs[s - 1],)
            wm = wm + (ws[W - 1 - s],)
    z = wm[0] * xm[0]
    for s in tl.static_range(1, W):
        z += ws[W - 1 - s] * xm[s]
    if SILU:
        sig = tl.sigmoid(z)
        dz = b_dy * sig * (1. + z * (1. - sig))
    else:
        dz = b_dy
    if ACC_DW:
        new_dws = ()
        for j in tl.static_range(W):
            new_dws = new_dws + (dws[j] + dz * xm[W - 1 - j],)
    else:
        new_dws = dws
    # dz_t reaches dx_{t-s} through tap W-1-s; dx_{t-W+1} then has all of its terms
    if W == 1:
        done = wm[0] * dz
        new_pend = ()
    else:
        done = pend[W - 2] + wm[W - 1] * dz
        new_pend = (wm[0] * dz,)
        for s in tl.static_range(1, W - 1):
            new_pend = new_pend + (pend[s - 1] + wm[s] * dz,)
    row = t - (W - 1)
    tl.store(dx + (row - t0) * C + o_c, done.to(dx.dtype.element_ty), mask=m_c & (row >= t0) & (row < t1))
    new_xs = ()
    if W > 1:
        new_xs = (b_x,)
        for k in tl.static_range(1, W - 1):
            new_xs = new_xs + (xs[k - 1],)
    return new_xs, new_pend, new_dws


@triton.jit
def _load_row(x, dy, doc_pos, t, t0, T, stride_xt, stride_yt, o_c, m_c, HAS_DOC: tl.constexpr):
    m = m_c & (t < T)
    b_x = tl.load(x + (t - t0) * stride_xt + o_c, mask=m, other=0.).to(tl.float32)
    b_dy = tl.load(dy + (t - t0) * stride_yt + o_c, mask=m, other=0.).to(tl.float32)
    if HAS_DOC:
        b_p = tl.load(doc_pos + t, mask=t < T, other=0)
    else:
        b_p = 0
    return b_x, b_dy, b_p


@triton.jit
def short_conv_bwd_kernel(x, w, doc_pos, dy, dx, dw, T, C, NT, stride_xb, stride_xt, stride_yb, stride_yt,
                          W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, R: tl.constexpr,
                          SILU: tl.constexpr, HAS_DOC: tl.constexpr):
    tl.static_assert(BT % R == 0)
    i_bt, i_c = tl.program_id(0), tl.program_id(1)
    i_b, i_t = i_bt // NT, i_bt % NT
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    t0 = i_t * BT
    t1 = tl.minimum(t0 + BT, T)  # this program's dx rows and dw terms: [t0, t1)
    # 64-bit offsets once per program; rows are addressed relative to t0 in 32 bits
    x += i_b.to(tl.int64) * stride_xb + t0.to(tl.int64) * stride_xt
    dy += i_b.to(tl.int64) * stride_yb + t0.to(tl.int64) * stride_yt
    dx += (i_b.to(tl.int64) * T + t0) * C
    ws = ()  # ws[j] = w[:, j]
    dws = ()  # dws[j]: this program's part of dw[:, j]
    for j in tl.static_range(W):
        ws = ws + (tl.load(w + o_c * W + j, mask=m_c, other=0.).to(tl.float32),)
        dws = dws + (tl.zeros([BC], dtype=tl.float32),)
    xs = ()  # the W - 1 inputs before t0, newest first
    pend = ()
    for k in tl.static_range(W - 1):
        t = t0 - 1 - k
        xs = xs + (tl.load(x + (-1 - k) * stride_xt + o_c, mask=m_c & (t >= 0), other=0.).to(tl.float32),)
        pend = pend + (tl.zeros([BC], dtype=tl.float32),)
    # Rows past T (the last block's final step) load zeros: dz = 0 there, so they neither add
    # to dw nor change a stored dx row.
    for tb in range(t0, t1, R):
        rows = ()
        for r in tl.static_range(R):
            rows = rows + (_load_row(x, dy, doc_pos, tb + r, t0, T, stride_xt, stride_yt, o_c, m_c, HAS_DOC),)
        for r in tl.static_range(R):
            b_x, b_dy, b_p = rows[r]
            xs, pend, dws = _bwd_row(tb + r, b_x, b_dy, b_p, dx, C, t0, t1, o_c, m_c, ws, xs, pend, dws,
                                     W, SILU, HAS_DOC, True)
    # The last W - 1 rows need dz of the next block's first rows (recomputed here, not in dw).
    tf = t0 + tl.cdiv(t1 - t0, R) * R
    for k in tl.static_range(W - 1):
        b_x, b_dy, b_p = _load_row(x, dy, doc_pos, tf + k, t0, T, stride_xt, stride_yt, o_c, m_c, HAS_DOC)
        xs, pend, dws = _bwd_row(tf + k, b_x, b_dy, b_p, dx, C, t0, t1, o_c, m_c, ws, xs, pend, dws,
                                 W, SILU, HAS_DOC, False)
    dw += (i_bt.to(tl.int64) * C + o_c) * W
    for j in tl.static_range(W):
        tl.store(dw + j, dws[j], mask=m_c)



def _new(x: torch.Tensor, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    out = x.new_empty(shape, dtype=dtype if dtype is not None else x.dtype)
    return out.fill_(float("nan")) if POISON else out


def _unit_channel_stride(x: torch.Tensor) -> torch.Tensor:
    # Views along the channels (q, k, v of one projection) are fine; the kernels need unit
    # channel stride for coalesced rows.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def short_conv_fwd(x: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """Forward launcher (inputs already validated): ``y: [B, T, C]`` contiguous, ``x.dtype``."""
    x = _unit_channel_stride(x)
    B, T, C = x.shape
    W = weight.shape[1]
    y = _new(x, B, T, C)
    if y.numel() == 0:
        return y
    BT, BC = FWD["BT"], FWD["BC"]
    NT = triton.cdiv(T, BT)
    short_conv_fwd_kernel[(B * NT, triton.cdiv(C, BC))](
        x, weight.contiguous(), doc_pos, y, T, C, NT, x.stride(0), x.stride(1),
        W=W, BT=BT, BC=BC, SILU=silu, HAS_DOC=doc_pos is not None, num_warps=FWD["num_warps"])
    return y


def short_conv_bwd(x: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None, dy: torch.Tensor,
                   silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher: ``(dx in x.dtype, dw in weight.dtype)``; recomputes the pre-activation."""
    x, dy = _unit_channel_stride(x), _unit_channel_stride(dy)
    B, T, C = x.shape
    W = weight.shape[1]
    cfg = BWD_DOCS if doc_pos is not None else BWD
    BT, BC, R = cfg["BT"], cfg["BC"], cfg["R"]
    NT = triton.cdiv(T, BT)
    dx = _new(x, B, T, C)
    dw_part = _new(x, B * NT, C, W, dtype=torch.float32)  # [B x T-blocks, C, W]
    if dx.numel() > 0:
        short_conv_bwd_kernel[(B * NT, triton.cdiv(C, BC))](
            x, weight.contiguous(), doc_pos, dy, dx, dw_part, T, C, NT,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            W=W, BT=BT, BC=BC, R=R, SILU=silu, HAS_DOC=doc_pos is not None, num_warps=cfg["num_warps"])
    return dx, dw_part.sum(0).to(weight.dtype)


# --- torch.library registration: an outer torch.compile traces through the op ----------------

def _fwd(x: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None, silu: bool) -> torch.Tensor:
    return short_conv_fwd(x, weight, doc_pos, silu)


def _fwd_fake(x, weight, doc_pos, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _bwd(x: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None, dy: torch.Tensor,
            silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return short_conv_bwd(x, weight, doc_pos, dy, silu)


def _bwd_fake(x, weight, doc_pos, dy, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, doc_pos, silu = inputs
    ctx.save_for_backward(x, weight, doc_pos)  # not the pre-activation: backward recomputes it
    ctx.silu = silu


def _grads(ctx, bwd_op, dy):
    x, weight, doc_pos = ctx.saved_tensors
    dx, dw = bwd_op(x, weight, doc_pos, dy, ctx.silu)
    return dx, dw, None, None


_fwd_op, _bwd_op = register_autograd_op("short_conv", forward=_fwd, forward_fake=_fwd_fake, backward=_bwd,
                                        backward_fake=_bwd_fake, setup_context=_setup_context, grads=_grads)


def _check(x, weight, doc_pos, silu) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [B, T, C], got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, T, C] (3 dims), got {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    B, T, C = x.shape
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor of shape [C, W], got {type(weight).__name__}")
    if weight.ndim != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must have shape [C, W] with C = {C} (x's channels), got {tuple(weight.shape)}")
    if not 1 <= weight.shape[1] <= MAX_W:
        raise ValueError(f"weight's kernel size W must be in [1, {MAX_W}], got {weight.shape[1]}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {weight.dtype}")
    if doc_pos is not None:
        if not isinstance(doc_pos, torch.Tensor):
            raise TypeError(f"doc_pos must be None or a torch.Tensor of shape [T], got {type(doc_pos).__name__}")
        if doc_pos.is_floating_point() or doc_pos.is_complex() or doc_pos.dtype == torch.bool:
            raise TypeError(f"doc_pos must have an integer dtype, got {doc_pos.dtype}")
        if tuple(doc_pos.shape) != (T,):
            raise ValueError(f"doc_pos must have shape [T] = {(T,)}, got {tuple(doc_pos.shape)}")
    if not isinstance(silu, bool):
        raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    for name, t in (("weight", weight), ("doc_pos", doc_pos)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: they must be on one device")
    if not x.is_cuda and not interpreted():
        raise ValueError(f"x is on {x.device}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
                         "before triton is imported (CPU, slow); on CPU use deltanet.layers.conv.causal_conv")


def short_conv(x: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None = None,
               silu: bool = True) -> torch.Tensor:
    """Causal depthwise convolution ``[B, T, C] -> [B, T, C]`` with optional SiLU (Triton).

    Args:
        x: ``[B, T, C]`` float16 / bfloat16 / float32; any strides with unit channel stride
            (other layouts are copied).
        weight: ``[C, W]``, ``1 <= W <= 8``; ``weight[:, W-1]`` multiplies the current input.
        doc_pos: ``[T]`` integer positions inside documents (packed batches), or None.
        silu: apply SiLU to the output.

    Returns ``y`` in ``x.dtype``, differentiable in ``x`` and ``weight``. Same function as
    ``deltanet.layers.conv._padded_conv``.

    Example (CUDA, or CPU with ``TRITON_INTERPRET=1`` set before importing triton)::

        >>> x = torch.randn(2, 100, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        >>> w = torch.randn(64, 4, device="cuda", requires_grad=True)
        >>> y = short_conv(x, w)
        >>> y.sum().backward()
        >>> y.shape, x.grad.dtype, w.grad.dtype
        (torch.Size([2, 100, 64]), torch.bfloat16, torch.float32)
    """
    _check(x, weight, doc_pos, silu)
    return _fwd_op(x, weight, doc_pos, silu)
