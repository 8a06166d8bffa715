"""The projections of a one-token decode step as bandwidth-bound GEMVs, each fused with its
neighbours: kernel, launcher, custom op, public functions, reference.

A decode step multiplies a few rows (``M`` = batch, one token each) by every weight matrix of
the model once. At ``M <= 64`` that is a matrix-vector product bound by streaming the weights,
and the eager step spends more time launching the norms, casts, adds and activations around the
projections than in them. One kernel (``decode_linear_kernel``) covers the three shapes a block
needs:

- ``rms_norm_linear_decode``: ``h = rmsnorm(x) * w_norm``, then ``h @ W_i^T`` for up to
  ``MAX_WEIGHTS`` separate matrices (a mixer's q, k, v, beta, decay and gate projections), into
  one output buffer whose column slices are returned;
- ``rms_norm_swiglu_decode``: the same norm, then ``silu(h @ W_g^T) * (h @ W_u^T)``;
- ``linear_residual_decode``: ``r + x @ W^T`` (the output and down projections with the
  residual add).

Each program owns ``BN`` output columns of one matrix (of two for SwiGLU: the gate and up tiles
share the loads of ``x``) and all ``M`` rows (up to 64 per program; more rows take more programs
along the second grid axis), walks the input channels in ``BK``-wide blocks and accumulates in
fp32 with ``tl.dot``: every weight element is read once per step at batch 1 and batch 32 alike.
The norm's ``1/rms`` per row is a first, cheap pass over the ``[M, C]`` input.

A shape with few output columns (o_proj and the down projection: 1024 columns, 64 programs of
16) leaves most of a 132-SM GPU idle at batch 1, each program streaming a long row. Split-K
(``GemvConfig.SPLIT_K``) gives each program one range of the input channels instead: the
programs write fp32 partial sums to a workspace and a second, small kernel adds them in split
order (deterministic, no atomics), then rounds, applies SwiGLU and adds the residual, which all
need the whole sum. ``select_config`` splits where a shape has fewer than ~1.5 programs per SM.

The weights stay separate parameters: the kernel takes one pointer per matrix (a constexpr
count, constexpr row counts) and picks the matrix from the program id. Concatenating them once
into one buffer the parameters view into would also avoid a per-call copy, but ``.to()``,
``load_state_dict`` and safetensors' shared-storage check each break or refuse such views.

The eager layer's roundings are reproduced: the normalised input, each projection, ``silu(g)``,
the product and the residual sum are rounded to the activation dtype where the eager layer
holds them in it, so both routes agree up to fp32 accumulation order. Inference only (no
autograd); registered as a ``torch.library`` custom op (one op for ``torch.compile``, CUDA-graph
capture and op counts).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .delta_rule.config import device_sms
from .delta_rule.interpreter import interpreted  # importing applies the interpreter fixes (bf16 tl.dot)
from .pdl import launch_options, pdl_for, pdl_wait, prefetch_rows

__all__ = ["GemvConfig", "MAX_WEIGHTS", "MEASURED", "decode_linear_reference", "linear_residual_decode",
           "measured_config", "rms_norm_linear_decode", "rms_norm_swiglu_decode", "select_config"]

MAX_WEIGHTS = 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_BM = 64  # rows per program (the batch of a decode step); more rows: more programs along axis 1
MAX_SPLIT_K = 64
H100_SMS = 132  # select_config's default SM count (an H200 has as many)
# Whether calls without a ``config`` let ``select_config`` split K (by the device's SM count) where
# :data:`MEASURED` has no entry. Off: timed on an H100 (2026-12-07), the rule's splits gave the
# captured decode step no steady gain; the measured entries split where the sweep found it faster.
SPLIT_K_BY_DEFAULT = False

# Tests set this: the output starts as NaN, so an element the kernel forgets to write shows up.
POISON = False


@triton.jit
def _finish(acc, acc2, res, y, stride_y, off_m, o_n, M, N, OFF, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr):
    """The eager layer's roundings on the complete fp32 sums of rows ``off_m``, columns ``o_n`` of
    one matrix (``acc2``: SwiGLU's up projection), stored to columns ``OFF + o_n`` of ``y``."""
    dt = y.dtype.element_ty
    out = acc.to(dt).to(tl.float32)  # the projection, as the eager layer holds it
    if SWIGLU:  # silu(g) * u, each rounded as in the eager layer
        act = (out / (1.0 + tl.exp(-out))).to(dt).to(tl.float32)
        out = act * acc2.to(dt).to(tl.float32)
    m_out = (off_m < M)[:, None] & (o_n < N)[None, :]
    if HAS_RES:
        out += tl.load(res + off_m[:, None] * stride_y + o_n[None, :], mask=m_out, other=0.0).to(tl.float32)
    tl.store(y + off_m[:, None] * stride_y + OFF + o_n[None, :], out.to(dt), mask=m_out)


@triton.jit
def _mac(acc, b_x, b_w, IEEE: tl.constexpr, DOT: tl.constexpr):
    """``acc + b_x @ b_w^T`` in fp32 (``b_x [BM, BK]``, ``b_w [BN, BK]``)."""
    if DOT:
        if IEEE:  # fp32 weights: full fp32 products (tf32 would cost ~1e-3 relative error)
            acc += tl.dot(b_x, tl.trans(b_w), input_precision="ieee")
        else:
            acc += tl.dot(b_x, tl.trans(b_w))
    else:  # a few rows: fp32 products summed along K in registers (no padding to 16 rows)
        acc += tl.sum(b_x.to(tl.float32)[:, None, :] * b_w.to(tl.float32)[None, :, :], 2)
    return acc


@triton.jit
def _rstd(x, stride_x, off_m, M, eps, C: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr):
    """1/rms per row over all ``C`` channels, fp32 (the eager norm's statistics)."""
    ss = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, C, BK):
        o_k = c0 + tl.arange(0, BK)
        b_x = tl.load(x + off_m[:, None] * stride_x + o_k[None, :],
                      mask=(off_m < M)[:, None] & (o_k < C)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(b_x * b_x, 1)
    return 1.0 / tl.sqrt(ss / C + eps)


@triton.jit
def _x_tile(x, stride_x, wn, rstd, off_m, o_k, m_m, m_k, dt, NORM: tl.constexpr):
    """Rows ``off_m``, channels ``o_k`` of the input, normed as the eager layer rounds it."""
    b_x = tl.load(x + off_m[:, None] * stride_x + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
    if NORM:  # the eager norm's output, rounded to the activation dtype
        b_wn = tl.load(wn + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_x = (b_x.to(tl.float32) * rstd[:, None] * b_wn[None, :]).to(dt)
    return b_x


@triton.jit
def _tile(x, stride_x, wn, eps, w, res, y, stride_y, ws, off_m, n0, k0, M,
          N: tl.constexpr, C: tl.constexpr, OFF: tl.constexpr, w2, WS_N: tl.constexpr,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_SPLIT: tl.constexpr, SPLIT: tl.constexpr,
          NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, DOT: tl.constexpr,
          PDL: tl.constexpr, LINE: tl.constexpr):
    """Columns ``n0 .. n0 + BN`` of one matrix ``w`` ([N, C], contiguous) for rows ``off_m``, over
    the input channels ``k0 .. k0 + K_SPLIT``: the finished output columns ``OFF + n`` of ``y``,
    or (``SPLIT``) the fp32 partial sums into the workspace ``ws`` ([M, WS_N] for this split;
    SwiGLU's up sums ``N`` columns after the gate's). ``w2``: SwiGLU's up matrix (same shape).
    ``PDL``: the weight rows are prefetched into L2 (one request per ``LINE`` elements, 128 bytes)
    before waiting for the previous kernel, everything else is read after (``deltanet.ops.pdl``)."""
    dt = y.dtype.element_ty
    o_n = n0 + tl.arange(0, BN)
    m_m, m_n = off_m < M, o_n < N
    if PDL:  # this program's weight rows into L2 (nothing writes weights) while the previous kernel runs
        prefetch_rows(w, o_n, m_n, k0, C, K_SPLIT, LINE)
        if SWIGLU:
            prefetch_rows(w2, o_n, m_n, k0, C, K_SPLIT, LINE)
        pdl_wait(PDL)
    rstd = tl.zeros([BM], dtype=tl.float32)
    if NORM:  # every program (and split) normalises over all C channels; the input is tiny next to the weights
        rstd = _rstd(x, stride_x, off_m, M, eps, C, BK, BM)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    for kk in range(0, K_SPLIT, BK):  # a constant trip count (K_SPLIT: a multiple of BK), masked at C
        o_k = k0 + kk + tl.arange(0, BK)
        m_k = o_k < C
        b_x = _x_tile(x, stride_x, wn, rstd, off_m, o_k, m_m, m_k, dt, NORM)
        b_w = tl.load(w + o_n[:, None] * C + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        acc = _mac(acc, b_x, b_w, IEEE, DOT)
        if SWIGLU:  # loaded after the gate's product: fewer live registers (sm_90, M = 1: 152, not 205)
            b_w2 = tl.load(w2 + o_n[:, None] * C + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
            acc2 = _mac(acc2, b_x, b_w2, IEEE, DOT)
    if SPLIT:
        m_out = m_m[:, None] & m_n[None, :]
        tl.store(ws + off_m[:, None] * WS_N + OFF + o_n[None, :], acc, mask=m_out)
        if SWIGLU:
            tl.store(ws + off_m[:, None] * WS_N + N + o_n[None, :], acc2, mask=m_out)
    else:
        _finish(acc, acc2, res, y, stride_y, off_m, o_n, M, N, OFF, SWIGLU, HAS_RES)


@triton.jit
def decode_linear_kernel(x, stride_x, wn, res, y, stride_y, ws, M, eps,
                         w0, w1, w2, w3, w4, w5, w6, w7,
                         N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
                         N4: tl.constexpr, N5: tl.constexpr, N6: tl.constexpr, N7: tl.constexpr,
                         B1: tl.constexpr, B2: tl.constexpr, B3: tl.constexpr, B4: tl.constexpr,
                         B5: tl.constexpr, B6: tl.constexpr, B7: tl.constexpr, C: tl.constexpr, WS_N: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_SPLIT: tl.constexpr,
                         SPLIT: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RES: tl.constexpr,
                         IEEE: tl.constexpr, DOT: tl.constexpr, PDL: tl.constexpr = False,
                         LINE: tl.constexpr = 64):
    """Programs over (column blocks of all matrices, row blocks, splits of the input channels).
    Matrix ``i`` has ``N_i`` rows (0: absent) and owns the ``cdiv(N_i, BN)`` column blocks from
    ``B_i`` on (``B_0 = 0``); its outputs are columns ``N_0 + .. + N_{i-1}`` onwards of ``y``
    (SwiGLU: ``w0`` gate, ``w1`` up, output ``[M, N0]``). ``SPLIT``: split ``s`` sums channels
    ``s * K_SPLIT`` onwards into ``ws[s]`` ([SPLIT_K, M, WS_N] fp32); the epilogue kernel finishes."""
    pid, i_m, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    off_m = i_m * BM + tl.arange(0, BM)
    k0 = i_k * K_SPLIT
    if SPLIT:
        ws += i_k * M * WS_N
    if SWIGLU:
        _tile(x, stride_x, wn, eps, w0, res, y, stride_y, ws, off_m, pid * BN, k0, M, N0, C, 0, w1, WS_N,
              BM, BN, BK, K_SPLIT, SPLIT, NORM, True, False, IEEE, DOT, PDL, LINE)
    else:
        if pid < B1:
            _tile(x, stride_x, wn, eps, w0, res, y, stride_y, ws, off_m, pid * BN, k0, M, N0, C, 0, w0, WS_N,
                  BM, BN, BK, K_SPLIT, SPLIT, NORM, False, HAS_RES, IEEE, DOT, PDL, LINE)
        if N1 > 0:
            if (pid >= B1) & (pid < B2):
                _tile(x, stride_x, wn, eps, w1, res, y, stride_y, ws, off_m, (pid - B1) * BN, k0, M, N1, C,
                      N0, w1, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)
        if N2 > 0:
            if (pid >= B2) & (pid < B3):
                _tile(x, stride_x, wn, eps, w2, res, y, stride_y, ws, off_m, (pid - B2) * BN, k0, M, N2, C,
                      N0 + N1, w2, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)
        if N3 > 0:
            if (pid >= B3) & (pid < B4):
                _tile(x, stride_x, wn, eps, w3, res, y, stride_y, ws, off_m, (pid - B3) * BN, k0, M, N3, C,
                      N0 + N1 + N2, w3, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)
        if N4 > 0:
            if (pid >= B4) & (pid < B5):
                _tile(x, stride_x, wn, eps, w4, res, y, stride_y, ws, off_m, (pid - B4) * BN, k0, M, N4, C,
                      N0 + N1 + N2 + N3, w4, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)
        if N5 > 0:
            if (pid >= B5) & (pid < B6):
                _tile(x, stride_x, wn, eps, w5, res, y, stride_y, ws, off_m, (pid - B5) * BN, k0, M, N5, C,
                      N0 + N1 + N2 + N3 + N4, w5, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)
        if N6 > 0:
            if (pid >= B6) & (pid < B7):
                _tile(x, stride_x, wn, eps, w6, res, y, stride_y, ws, off_m, (pid - B6) * BN, k0, M, N6, C,
                      N0 + N1 + N2 + N3 + N4 + N5, w6, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)
        if N7 > 0:
            if pid >= B7:
                _tile(x, stride_x, wn, eps, w7, res, y, stride_y, ws, off_m, (pid - B7) * BN, k0, M, N7, C,
                      N0 + N1 + N2 + N3 + N4 + N5 + N6, w7, WS_N, BM, BN, BK, K_SPLIT, SPLIT, NORM, False, False, IEEE, DOT, PDL, LINE)


@triton.jit
def decode_linear_epilogue_kernel(ws, res, y, stride_y, M, N: tl.constexpr, WS_N: tl.constexpr,
                                  SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                                  SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr = False):
    """Split-K's second launch: the ``SPLIT_K`` fp32 partial sums of each output element added in
    split order (deterministic), then the main kernel's roundings, SwiGLU and residual."""
    pdl_wait(PDL)
    off_m = tl.program_id(1) * BM + tl.arange(0, BM)
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    mask = (off_m < M)[:, None] & (o_n < N)[None, :]
    p = ws + off_m[:, None] * WS_N + o_n[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    acc2 = tl.zeros([BM, BN], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(p + s * M * WS_N, mask=mask, other=0.0)
        if SWIGLU:
            acc2 += tl.load(p + s * M * WS_N + N, mask=mask, other=0.0)
    _finish(acc, acc2, res, y, stride_y, off_m, o_n, M, N, 0, SWIGLU, HAS_RES)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch settings of ``decode_linear_kernel``: ``BN`` output columns and ``BK`` input channels
    per program and step (powers of two; ``BN >= 16`` with ``dot``, ``BK >= 16``), ``num_warps``,
    ``num_stages`` (software pipelining of the weight loads), ``SPLIT_K`` and ``dot``.

    ``SPLIT_K > 1`` splits the input channels into that many ranges of whole ``BK`` blocks, one
    program each: ``SPLIT_K`` times the programs for a shape with few output columns, each
    streaming ``1 / SPLIT_K`` of the row. The programs write fp32 partial sums to a
    ``[SPLIT_K, M, N]`` workspace and a second, small kernel adds them in split order
    (deterministic, no atomics) before the roundings, SwiGLU and residual (which need the whole
    sum): two launches instead of one. The norm's ``1/rms`` is computed over the whole row by
    every split. ``dot=False``: products summed in registers instead of ``tl.dot``, rows per
    program ``next_power_of_2(M)`` up to 4 (``tl.dot`` pads them to 16) and ``BN`` down to 4; for
    ``M <= 4`` only (more rows re-read the weights once per 4 rows).
    """

    BN: int = 16
    BK: int = 256
    num_warps: int = 4
    num_stages: int = 3
    SPLIT_K: int = 1
    dot: bool = True

    def __post_init__(self):
        if not isinstance(self.dot, bool):
            raise ValueError(f"GemvConfig.dot must be a bool, got {self.dot!r}")
        for name, low in (("BN", 16 if self.dot else 4), ("BK", 16)):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= low and v & (v - 1) == 0):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= {low}"
                                 f"{' (dot=False)' if name == 'BN' and not self.dot else ''}, got {v!r}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemvConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"GemvConfig.num_stages must be a positive int, got {self.num_stages!r}")
        if not (isinstance(self.SPLIT_K, int) and 1 <= self.SPLIT_K <= MAX_SPLIT_K):
            raise ValueError(f"GemvConfig.SPLIT_K must be an int from 1 to {MAX_SPLIT_K}, got {self.SPLIT_K!r}")


def _rows_per_program(M: int, dot: bool = True) -> int:
    # tl.dot needs 16 rows at least: a batch of one is padded to 16 (the products are free, the
    # weights are the traffic); without it, a few rows hold [BM, BN, BK] products in registers
    if not dot:
        return min(4, triton.next_power_of_2(M))
    return min(MAX_BM, max(16, triton.next_power_of_2(M)))


def select_config(M: int, N_total: int, dtype: torch.dtype, *, K: int | None = None,
                  num_sms: int = H100_SMS) -> GemvConfig:
    """The default settings for ``M`` rows, ``N_total`` output columns and ``K`` input channels on
    a GPU of ``num_sms`` SMs (``K`` None: no split).

    - ``BN``: 16 columns per program (the smallest ``tl.dot`` tile: the most programs), wider for
      the LM head (32000 columns already give 500+ programs).
    - ``BK``: the fp32 ``[BM, BK]`` input tile within ~32 registers a thread (sm_90, Triton 3.9:
      34-154 registers, no spills, <= 91 KB shared memory for the 340M shapes at M = 1 / 32 / 64).
    - ``SPLIT_K``: the smallest power of two that gives >= 1.5 programs per SM (bytes in flight:
      a GEMV at batch 1 streams each weight once, so the programs resident at once bound the
      bandwidth), at most 8 and at most one split per ``BK`` block. For the 340M model on a
      132-SM H100 / H200: o_proj (N = K = 1024) and the MLP down projection (N = 1024, K = 2816)
      get 4 (64 -> 256 programs), the gate/up projections 2 (176 -> 352 column blocks), the
      input projections (257 blocks) and the LM head 1.
    - ``num_warps = 4``, ``num_stages = 3``, ``dot = True``.

    Measured: the roundings (tests) and the resources, compiled for sm_90 without a GPU (Triton
    3.9, 2026-12-07, the 340M shapes at M = 1 and 32 with these defaults, split or not): 34-152
    registers, no spills, <= 58 KB shared memory; the split-K epilogue 32-38 registers, none.
    Timed (H100, 2026-12-07): the split rule on its own moved the captured 340M decode step by
    -2% to +7% (so ``SPLIT_K_BY_DEFAULT`` is off); the shapes where a setting measured faster take it
    from :data:`MEASURED` before this rule is asked. ``benchmarks/bench_decode_step.py
    --gemv-sweep`` times any shape's settings and names the best.
    """
    BM = _rows_per_program(M)
    BN = 16 if N_total <= 8192 else 32 if N_total <= 16384 else 64
    BK = {16: 256, 32: 128, 64: 64}[BM]
    if dtype == torch.float32:
        BK = max(32, BK // 2)
    split = 1
    if K is not None:
        programs = triton.cdiv(N_total, BN) * triton.cdiv(M, BM)
        most = min(8, triton.cdiv(K, BK))
        while programs * split < 1.5 * num_sms and split * 2 <= most:
            split *= 2
    return GemvConfig(BN=BN, BK=BK, num_warps=4, num_stages=3, SPLIT_K=split)


# Measured optima, used before ``select_config``'s rule: (rows per program, N_total, K) ->
# settings, bf16, for the 340M block's projections (hidden 1024, MLP 2816; N_total as ``_call``
# passes it: the summed rows of the weights, one of the two for SwiGLU). H100, Triton 3.6,
# ``benchmarks/bench_decode_step.py --gemv-sweep`` at batch 1 (2026-12-07, 16 rows per program)
# and batch 32 (2026-12-07, 32 rows), µs per call against the rule's settings without split:
#   16 rows: input projections 8.88 -> 8.23 (BN 32), MLP down 8.09 -> 7.27 (8 splits);
#   32 rows: input projections 16.19 -> 14.19, gated 16.13 -> 14.20 (BN 32, BK 256, 2 splits),
#            MLP gate/up 16.09 -> 11.93 (BN 64, BK 256, 2 splits), down 10.91 -> 7.36 (BN 64, 8 splits).
# Wider column blocks at 32 rows: every program re-reads the [32, K] input, 32 / BN times the bytes
# of its weights (twice them at BN 16, half at BN 64); the splits win back the programs. The
# other shapes (o_proj, the LM head, the attention layers' projections, other batches) keep the
# rule: the sweep found <= 1% there or did not measure them.
MEASURED = {
    (16, 4104, 1024): GemvConfig(BN=32, BK=256, num_warps=4, num_stages=4),
    (16, 4112, 1024): GemvConfig(BN=32, BK=256, num_warps=4, num_stages=3),
    (16, 1024, 2816): GemvConfig(BN=16, BK=256, num_warps=4, num_stages=3, SPLIT_K=8),
    (32, 4104, 1024): GemvConfig(BN=32, BK=256, num_warps=4, num_stages=3, SPLIT_K=2),
    (32, 4112, 1024): GemvConfig(BN=32, BK=256, num_warps=4, num_stages=1, SPLIT_K=2),
    (32, 2816, 1024): GemvConfig(BN=64, BK=256, num_warps=4, num_stages=3, SPLIT_K=2),
    (32, 1024, 2816): GemvConfig(BN=64, BK=128, num_warps=4, num_stages=3, SPLIT_K=8),
}


def measured_config(M: int, N_total: int, K: int, dtype: torch.dtype) -> GemvConfig | None:
    """The measured settings for this shape (:data:`MEASURED`), or None."""
    if dtype != torch.bfloat16:
        return None
    return MEASURED.get((_rows_per_program(M), N_total, K))


def _launch(x: torch.Tensor, weights: list[torch.Tensor], norm_weight: Optional[torch.Tensor],
            residual: Optional[torch.Tensor], eps: float, swiglu: bool, block_n: int, block_k: int, num_warps: int,
            num_stages: int, split_k: int, dot: bool) -> torch.Tensor:
    M, C = x.shape
    Ns = [w.shape[0] for w in weights]
    N_out = Ns[0] if swiglu else sum(Ns)
    y = torch.empty(M, N_out, dtype=x.dtype, device=x.device)
    BM, BN, BK = _rows_per_program(M, dot), block_n, block_k
    # whole BK blocks per split, so that every split's loop has the same constant trip count; the
    # last splits may start past C (then they store zeros)
    K_SPLIT = triton.cdiv(triton.cdiv(C, split_k), BK) * BK
    WS_N = 2 * N_out if swiglu else N_out
    # fp32 partial sums [SPLIT_K, M, WS_N]: its size follows the shapes only (CUDA graphs, compile)
    ws = torch.empty(split_k, M, WS_N, dtype=torch.float32, device=x.device) if split_k > 1 else y
    if POISON:
        y.fill_(float("nan"))
        ws.fill_(float("nan"))
    n_blocks = triton.cdiv(Ns[0], BN) if swiglu else sum(triton.cdiv(n, BN) for n in Ns)
    wts = list(weights) + [weights[0]] * (MAX_WEIGHTS - len(weights))  # absent: N = 0, never read
    Ns = Ns + [0] * (MAX_WEIGHTS - len(Ns))
    starts = [0]  # B_i: the first column block of matrix i
    for n in Ns[:-1]:
        starts.append(starts[-1] + triton.cdiv(n, BN))
    res = residual if residual is not None else x
    pdl = pdl_for(x)
    launch = launch_options(pdl)
    decode_linear_kernel[(n_blocks, triton.cdiv(M, BM), split_k)](
        x, x.stride(0), norm_weight if norm_weight is not None else x, res, y, y.stride(0), ws, M, eps, *wts, *Ns,
        *starts[1:], C=C, WS_N=WS_N, BM=BM, BN=BN, BK=BK, K_SPLIT=K_SPLIT, SPLIT=split_k > 1,
        NORM=norm_weight is not None, SWIGLU=swiglu, HAS_RES=residual is not None, IEEE=x.dtype == torch.float32,
        DOT=dot, PDL=pdl, LINE=128 // x.element_size(), num_warps=num_warps, num_stages=num_stages, **launch)
    if split_k > 1:
        EBM = min(16, triton.next_power_of_2(M))
        EBN = max(64, 1024 // EBM)
        decode_linear_epilogue_kernel[(triton.cdiv(N_out, EBN), triton.cdiv(M, EBM))](
            ws, res, y, y.stride(0), M, N=N_out, WS_N=WS_N, SPLIT_K=split_k, BM=EBM, BN=EBN, SWIGLU=swiglu,
            HAS_RES=residual is not None, PDL=pdl, num_warps=4, **launch)
    return y


_op = torch.library.custom_op("deltanet::decode_linear", _launch, mutates_args=())


@_op.register_fake
def _launch_fake(x, weights, norm_weight, residual, eps, swiglu, block_n, block_k, num_warps, num_stages, split_k,
                 dot):
    n = weights[0].shape[0] if swiglu else sum(w.shape[0] for w in weights)
    return x.new_empty(x.shape[0], n)


def _validate(x, weights, norm_weight, residual, swiglu: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.dtype not in DTYPES:
        raise TypeError(f"x must be a float32, bfloat16 or float16 tensor [..., C], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"x must have at least one row and one channel, got shape {list(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError("x must be contiguous along its last dim")
    C = x.shape[-1]
    if not isinstance(weights, (list, tuple)) or not 1 <= len(weights) <= MAX_WEIGHTS:
        raise ValueError(f"weights must be a list of 1 to {MAX_WEIGHTS} matrices [N_i, {C}], got "
                         f"{len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__}")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a tensor, got {type(w).__name__}")
        if w.ndim != 2 or w.shape[1] != C or w.shape[0] == 0:
            raise ValueError(f"weights[{i}] must have shape [N, {C}] (C = x's last dim), got {list(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"weights[{i}] must have x's dtype {x.dtype}, got {w.dtype}")
        if not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous")
        if w.device != x.device:
            raise ValueError(f"weights[{i}] is on {w.device}, x on {x.device}")
    if norm_weight is not None:
        if not isinstance(norm_weight, torch.Tensor) or tuple(norm_weight.shape) != (C,):
            raise ValueError(f"norm_weight must have shape [{C}] (x's last dim), got "
                             f"{list(getattr(norm_weight, 'shape', []))}")
        if not norm_weight.is_floating_point() or norm_weight.stride(0) != 1 or norm_weight.device != x.device:
            raise ValueError("norm_weight must be a contiguous floating tensor on x's device")
    if swiglu and (len(weights) != 2 or weights[0].shape != weights[1].shape):
        raise ValueError("SwiGLU takes two weights of the same shape (gate, up), got "
                         f"{[list(w.shape) for w in weights]}")
    if residual is not None:
        N = weights[0].shape[0]
        if len(weights) != 1 or swiglu:
            raise ValueError("a residual goes with one weight matrix (no SwiGLU)")
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != (*x.shape[:-1], N):
            raise ValueError(f"residual must have shape {[*x.shape[:-1], N]}, got "
                             f"{list(getattr(residual, 'shape', []))}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(f"residual must be a {x.dtype} tensor on {x.device}, got {residual.dtype} on "
                            f"{residual.device}")


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and not interpreted():
        raise ValueError(f"x is on {x.device}: the Triton decode kernels need CUDA tensors, or TRITON_INTERPRET=1 "
                         "set before triton is imported (CPU, slow); use decode_kernel='eager' on CPU")


def _call(x, weights, norm_weight, residual, eps, swiglu, config) -> torch.Tensor:
    """``[..., N]`` from ``x [..., C]`` through the kernel (rows flattened)."""
    _validate(x, weights, norm_weight, residual, swiglu)
    if config is not None and not isinstance(config, GemvConfig):
        raise TypeError(f"config must be a GemvConfig or None, got {type(config).__name__}")
    _check_device(x)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = residual.reshape(x2.shape[0], -1).contiguous() if residual is not None else None
    if config is None:
        N_total = weights[0].shape[0] if swiglu else sum(w.shape[0] for w in weights)
        config = measured_config(x2.shape[0], N_total, x2.shape[1], x.dtype) or select_config(
            x2.shape[0], N_total, x.dtype, K=x2.shape[1] if SPLIT_K_BY_DEFAULT else None,
            num_sms=device_sms(x.device))
    y = _op(x2, list(weights), norm_weight, r2, float(eps), swiglu, config.BN, config.BK, config.num_warps,
            config.num_stages, config.SPLIT_K, config.dot)
    return y.view(*lead, y.shape[-1])


def rms_norm_linear_decode(x: torch.Tensor, norm_weight: torch.Tensor | None, weights, eps: float = 1e-6, *,
                           config: GemvConfig | None = None) -> tuple:
    """``tuple(rmsnorm(x) * norm_weight @ W.T for W in weights)`` in one kernel (no norm when
    ``norm_weight`` is None), for a decode step's rows: ``x [..., C]``, each ``W [N_i, C]`` in
    ``x``'s dtype. The outputs are column slices of one ``[..., sum N_i]`` buffer (rows strided).
    ``config``: launch settings (default: :func:`select_config`'s), for every function here.

    Example (CUDA, or CPU with ``TRITON_INTERPRET=1`` set before importing triton)::

        >>> x, wn = torch.randn(3, 64), torch.rand(64)
        >>> q, b = rms_norm_linear_decode(x, wn, [torch.randn(48, 64), torch.randn(5, 64)])  # doctest: +SKIP
        >>> q.shape, b.shape  # doctest: +SKIP
        (torch.Size([3, 48]), torch.Size([3, 5]))
    """
    y = _call(x, weights, norm_weight, None, eps, False, config)
    out, start = [], 0
    for w in weights:
        out.append(y[..., start:start + w.shape[0]])
        start += w.shape[0]
    return tuple(out)


def rms_norm_swiglu_decode(x: torch.Tensor, norm_weight: torch.Tensor | None, gate_weight: torch.Tensor,
                           up_weight: torch.Tensor, eps: float = 1e-6, *, config: GemvConfig | None = None
                           ) -> torch.Tensor:
    """``silu(h @ W_g.T) * (h @ W_u.T)``, ``h = rmsnorm(x) * norm_weight`` (``x`` without a norm), in
    one kernel: the first half of a SwiGLU MLP for a decode step's rows."""
    return _call(x, [gate_weight, up_weight], norm_weight, None, eps, True, config)


def linear_residual_decode(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, *,
                           config: GemvConfig | None = None) -> torch.Tensor:
    """``residual + x @ weight.T`` (``x @ weight.T`` without a residual) in one kernel, for a decode
    step's rows: the output or down projection with the block's residual add."""
    return _call(x, [weight], None, residual, 0.0, False, config)


def decode_linear_reference(x, weights, norm_weight=None, residual=None, eps: float = 1e-6, swiglu: bool = False):
    """What the kernel computes, as the eager layer computes it (``rms_norm`` then ``F.linear`` in
    ``x``'s dtype, ``F.silu(g) * u``, ``residual + y``); any device. Returns the concatenated output
    ``[..., sum N_i]`` (SwiGLU: ``[..., N]``)."""
    _validate(x, weights, norm_weight, residual, swiglu)
    h = x
    if norm_weight is not None:
        xf = x.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(x.dtype)
    ys = [F.linear(h, w) for w in weights]
    if swiglu:
        return F.silu(ys[0]) * ys[1]
    y = torch.cat(ys, -1)
    return y if residual is None else residual + y
