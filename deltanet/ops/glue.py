"""Forward-only Triton kernels for the layers' elementwise glue at inference: one pass each.

Training runs the glue around the projections and the delta rule — RMSNorm (the blocks'
pre-norms, the per-head output norm, the final norm), the gated output norm, the q/k L2 norm,
SwiGLU's ``silu(g) * u`` — compiled into one kernel per call (``deltanet/layers/_fused.py``).
Inference (a prefill, scoring, ``deltanet eval``) used to run the same code eagerly: ~8 kernels
per norm, each a full float32 pass over ``[tokens, C]``. On an H100 (2026-12-07, deltanet-340m,
a 2K-token prompt at batch 32) those eager passes took ~380 of the forward's ~460 ms, the GEMMs
55 ms. These kernels do each call in one read of the inputs and one write:

- ``row_norm(x, d, weight=None, gate=None, gate_activation="silu", kind="rms", eps, out_dtype)``:
  over groups of ``d`` channels of ``x`` (``x.shape[-1]`` a multiple of ``d``),
  ``y = x * rsqrt(mean(x^2) + eps)`` (``kind="rms"``) or ``x * rsqrt(sum(x^2) + eps)``
  (``kind="l2"``), then ``* weight`` (``[d]``), then ``* silu(gate)`` or ``* sigmoid(gate)``
  (``gate`` shaped like ``x``), in ``out_dtype`` (default ``x.dtype``);
- ``swiglu(g, u)``: ``silu(g) * u``;
- ``rope(x, cos, sin)``: the rotary embedding of ``x: [..., H, D]`` (GPT-NeoX half-split layout)
  by the float32 angles' ``cos`` / ``sin`` (``[..., 1, D/2]``, computed once per layer by PyTorch,
  as the eager code does).

Everything is computed in float32 and rounded where the eager code rounds (``silu(g)`` of a bf16
``g`` is a bf16 tensor before the product), so both routes agree up to the order of a row's sum.
Registered as ``torch.library`` custom ops (``deltanet::row_norm``, ``deltanet::swiglu``,
``deltanet::rope``: one op each for CUDA-graph capture and op counts), inference only: no autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .delta_rule.interpreter import interpreted  # noqa: F401  (importing applies the interpreter fixes)

__all__ = ["DTYPES", "MAX_D", "rope", "row_norm", "swiglu"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_D = 16384  # a group is one tile of registers; wider groups stay eager
KINDS = {"rms": 0, "l2": 1}
GATES = {None: 0, "silu": 1, "sigmoid": 2}
ELEMS = 4096  # elements per program: rows of d channels are packed to about this many


@triton.jit
def row_norm_kernel(x, w, g, y, R, D, eps, stride_x, stride_g, stride_y,
                    L2: tl.constexpr, HAS_W: tl.constexpr, GATE: tl.constexpr,
                    BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    m_r, m_c = rows < R, cols < D
    m = m_r[:, None] & m_c[None, :]
    b_x = tl.load(x + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.).to(tl.float32)
    ss = tl.sum(b_x * b_x, axis=1)
    if L2:
        r = 1.0 / tl.sqrt(ss + eps)
    else:
        r = 1.0 / tl.sqrt(ss / D + eps)
    out = b_x * r[:, None]
    if HAS_W:
        out = out * tl.load(w + cols, mask=m_c, other=0.).to(tl.float32)[None, :]
    if GATE != 0:
        b_g = tl.load(g + rows[:, None] * stride_g + cols[None, :], mask=m, other=0.).to(tl.float32)
        if GATE == 1:
            out = out * (b_g / (1.0 + tl.exp(-b_g)))
        else:
            out = out / (1.0 + tl.exp(-b_g))
    tl.store(y + rows[:, None] * stride_y + cols[None, :], out.to(y.dtype.element_ty), mask=m)


@triton.jit
def swiglu_kernel(g, u, y, N, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    b_g = tl.load(g + o, mask=m, other=0.).to(tl.float32)
    b_u = tl.load(u + o, mask=m, other=0.).to(tl.float32)
    dt = y.dtype.element_ty
    act = (b_g / (1.0 + tl.exp(-b_g))).to(dt).to(tl.float32)  # silu(g), held in g's dtype
    tl.store(y + o, (act * b_u).to(dt), mask=m)


@triton.jit
def rope_kernel(x, c, s, y, H, D2, stride_xn, stride_xh, BH: tl.constexpr, BD: tl.constexpr):
    i_n, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_d = tl.arange(0, BD)
    o_h = i_h * BH + tl.arange(0, BH)
    m_d = o_d < D2
    m = (o_h < H)[:, None] & m_d[None, :]
    b_c = tl.load(c + i_n * D2 + o_d, mask=m_d, other=0.)[None, :]
    b_s = tl.load(s + i_n * D2 + o_d, mask=m_d, other=0.)[None, :]
    px = x + i_n * stride_xn + o_h[:, None] * stride_xh + o_d[None, :]
    x1 = tl.load(px, mask=m, other=0.).to(tl.float32)
    x2 = tl.load(px + D2, mask=m, other=0.).to(tl.float32)
    py = y + (i_n * H + o_h[:, None]) * (2 * D2) + o_d[None, :]
    dt = y.dtype.element_ty
    tl.store(py, (x1 * b_c - x2 * b_s).to(dt), mask=m)
    tl.store(py + D2, (x2 * b_c + x1 * b_s).to(dt), mask=m)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """``t`` as ``[rows, d]`` with unit stride along ``d`` (a view where the layout allows)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _check(name: str, t: torch.Tensor, like: torch.Tensor | None = None, like_name: str = "x") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")


@torch.library.custom_op("deltanet::row_norm", mutates_args=())
def _row_norm_op(x: torch.Tensor, weight: torch.Tensor | None, gate: torch.Tensor | None, d: int, kind: int,
                 gate_kind: int, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    x2 = _rows(x, d)
    g2 = _rows(gate, d) if gate is not None else None
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(-1, d)
    R = x2.shape[0]
    if R == 0:
        return y
    BD = triton.next_power_of_2(d)
    BR = max(1, min(ELEMS // BD, triton.next_power_of_2(R)))
    row_norm_kernel[(triton.cdiv(R, BR),)](
        x2, weight if weight is not None else x2, g2 if g2 is not None else x2, y2, R, d, eps,
        x2.stride(0), g2.stride(0) if g2 is not None else 0, y2.stride(0),
        L2=kind == 1, HAS_W=weight is not None, GATE=gate_kind, BR=BR, BD=BD,
        num_warps=4 if BR * BD <= 4096 else 8)
    return y


@_row_norm_op.register_fake
def _(x, weight, gate, d, kind, gate_kind, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def row_norm(x: torch.Tensor, d: int, *, weight: torch.Tensor | None = None, gate: torch.Tensor | None = None,
             gate_activation: str | None = "silu", kind: str = "rms", eps: float = 1e-6,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMS (``kind="rms"``) or L2 (``kind="l2"``) norm of ``x`` over groups of ``d`` channels, times
    ``weight`` (``[d]``) and ``act(gate)`` where given; float32 inside, ``out_dtype`` out (default
    ``x.dtype``). No autograd. See the module docstring.

    Example, with CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)::

        x = torch.randn(4, 7, 8 * 128, device="cuda", dtype=torch.bfloat16)
        w = torch.ones(128, device="cuda")
        y = row_norm(x, 128, weight=w)      # an RMSNorm over each of the 8 heads' 128 channels
    """
    _check("x", x)
    if isinstance(d, bool) or not isinstance(d, int) or d < 1 or x.ndim == 0 or x.shape[-1] % d:
        raise ValueError(f"d must be a positive int dividing x's last dim {tuple(x.shape)[-1:]}, got {d!r}")
    if d > MAX_D:
        raise ValueError(f"d must be at most {MAX_D} (one group per register tile), got {d}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if weight is not None:
        _check("weight", weight)
        if weight.shape != (d,) or weight.device != x.device:
            raise ValueError(f"weight must be a [{d}] tensor on {x.device}, got {tuple(weight.shape)} on {weight.device}")
        weight = weight.contiguous()
    if gate is not None:
        _check("gate", gate, x)
        if gate_activation not in ("silu", "sigmoid"):
            raise ValueError(f"gate_activation must be 'silu' or 'sigmoid', got {gate_activation!r}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPES:
        raise TypeError(f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    return _row_norm_op(x, weight, gate, d, KINDS[kind], GATES[gate_activation if gate is not None else None],
                        float(eps), out_dtype)


@torch.library.custom_op("deltanet::swiglu", mutates_args=())
def _swiglu_op(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    g, u = g.contiguous(), u.contiguous()
    y = torch.empty_like(g)
    N = g.numel()
    if N:
        BLOCK = 2048
        swiglu_kernel[(triton.cdiv(N, BLOCK),)](g, u, y, N, BLOCK=BLOCK, num_warps=4)
    return y


@_swiglu_op.register_fake
def _(g, u):
    return torch.empty_like(g)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` in ``g``'s dtype (``silu(g)`` rounded to it first, as the eager code holds it);
    ``g`` and ``u`` of one shape and dtype. No autograd."""
    _check("g", g)
    _check("u", u, g, "g")
    if u.dtype != g.dtype:
        raise TypeError(f"u must have g's dtype {g.dtype}, got {u.dtype}")
    return _swiglu_op(g, u)


@torch.library.custom_op("deltanet::rope", mutates_args=())
def _rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    H, D = x.shape[-2:]
    x3 = x.reshape(-1, H, D)
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    c2, s2 = cos.reshape(-1, D // 2).contiguous(), sin.reshape(-1, D // 2).contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    N = x3.shape[0]
    if N:
        BD = triton.next_power_of_2(D // 2)
        BH = max(1, min(triton.next_power_of_2(H), ELEMS // (2 * BD)))
        rope_kernel[(N, triton.cdiv(H, BH))](x3, c2, s2, y, H, D // 2, x3.stride(0), x3.stride(1),
                                             BH=BH, BD=BD, num_warps=4)
    return y


@_rope_op.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x: [..., H, D]`` rotated (half-split layout) by ``cos`` / ``sin`` (float32, ``[..., 1, D/2]``:
    one angle per position and frequency, shared by the heads), in ``x``'s dtype. No autograd."""
    _check("x", x)
    if x.ndim < 2 or x.shape[-1] % 2:
        raise ValueError(f"x must be [..., H, D] with an even D, got {tuple(x.shape)}")
    half = (*x.shape[:-2], 1, x.shape[-1] // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise TypeError(f"{name} must be a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != half or t.device != x.device:
            raise ValueError(f"{name} must be a {list(half)} tensor on {x.device}, got {tuple(t.shape)} on {t.device}")
    return _rope_op(x, cos, sin)
