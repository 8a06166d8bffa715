"""RMSNorm, and the gated RMSNorm used on DeltaNet's output (``rmsnorm(o) * silu(g)``, or
``* sigmoid(g)``).

The ungated norm is an ``autograd.Function`` that saves only its input and the per-row
``1/rms`` and recomputes the rest in backward: autograd through the float32 formula would
keep three float32 copies of every normalised activation (~400 MB per norm at 32K tokens x
1024, ~19 GB for a 24-layer model). On CUDA, training calls are compiled into one kernel each
way (``_fused.py``), inference calls take one forward-only Triton kernel (``deltanet.ops.glue``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._fused import compiled_or_eager, fused, inference_kernels, will_compile

__all__ = ["RMSNorm", "l2_norm", "rms_norm", "rms_norm_linear"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # float32 statistics at least: bf16 sums of squares lose digits at hidden sizes >= 1024
    return torch.promote_types(x.dtype, torch.float32)


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast, return the autocast dtype: the norm feeds several projections, which would
    # otherwise each keep their own bf16 copy of a float32 output for backward.
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, but ``t`` itself when it already has that dtype.

    For the outputs of the ``autograd.Function`` forwards below: torch 2.11's ``torch.compile``
    gives an ``autograd.Function`` whose forward returns a no-op conversion (``y.to(y.dtype)``,
    ``y.float()`` of a float32 ``y``) zero input gradients (fixed by 2.13). That hit the float32
    path (rms_norm without autocast, l2_norm of float32 q/k) on the GPU machine's stack:
    ``tests/layers/test_compiled_grads.py``."""
    return t if t.dtype == dtype else t.to(dtype)


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        ct = _compute_dtype(x)
        xf = x.to(ct)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return _cast(xf * rstd * weight.to(ct), _output_dtype(x))

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        ct = rstd.dtype
        xhat = x.to(ct) * rstd
        g = dy.to(ct) * weight.to(ct)
        dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))  # d/dx of x * rsqrt(mean(x^2) + eps)
        dw = (dy.to(ct) * xhat).reshape(-1, x.shape[-1]).sum(0)
        return dx.to(x.dtype), dw.to(weight.dtype), None


class _L2NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps: float):
        ct = _compute_dtype(x)
        rnorm = torch.rsqrt(x.to(ct).pow(2).sum(-1, keepdim=True) + eps)
        y = _cast(x.to(ct) * rnorm, x.dtype)
        ctx.save_for_backward(y, rnorm)  # y is kept by the delta rule anyway: no extra memory
        return y

    @staticmethod
    def backward(ctx, dy):
        y, rnorm = ctx.saved_tensors
        ct = rnorm.dtype
        yf, dyf = y.to(ct), dy.to(ct)
        return (rnorm * (dyf - yf * (dyf * yf).sum(-1, keepdim=True))).to(dy.dtype), None


def _glue():
    """:mod:`deltanet.ops.glue` (imported on first use: it needs Triton, which inference on CUDA has)."""
    from ..ops import glue

    return glue


def _takes(d: int, *tensors) -> bool:
    """Whether the glue kernels take groups of ``d`` channels of these tensors (dtypes they read)."""
    glue = _glue()
    return d <= glue.MAX_D and all(t.dtype in glue.DTYPES for t in tensors if t is not None)


def _l2_norm_inference(x, eps=1e-12):
    if not _takes(x.shape[-1], x):
        return NotImplemented
    return _glue().row_norm(x, x.shape[-1], kind="l2", eps=eps)


def _rms_norm_inference(x, weight, eps=1e-6):
    if not _takes(x.shape[-1], x, weight) or weight.shape != x.shape[-1:]:
        return NotImplemented
    return _glue().row_norm(x, x.shape[-1], weight=weight, eps=eps, out_dtype=_output_dtype(x))


def _gated_rms_norm_inference(x, gate, weight, eps=1e-6, activation="silu"):
    if (not _takes(x.shape[-1], x, gate, weight) or gate.shape != x.shape or weight.shape != x.shape[-1:]
            or gate.device != x.device):
        return NotImplemented
    return _glue().row_norm(x, x.shape[-1], weight=weight, gate=gate, gate_activation=activation, eps=eps)


@fused(inference=_l2_norm_inference)
def l2_norm(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dim; backward keeps only the output and ``1/|x|``
    (``F.normalize`` would also keep its input).

    Example::

        >>> l2_norm(torch.tensor([[3.0, 4.0]]))
        tensor([[0.6000, 0.8000]])
    """
    return _L2NormFn.apply(x, eps)


@fused(inference=_rms_norm_inference)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, float32 inside, memory-lean backward.

    Example::

        >>> x = torch.randn(2, 4)
        >>> torch.allclose(rms_norm(x, torch.ones(4)), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
        True
    """
    return _RMSNormFn.apply(x, weight, eps)


@fused
def _norm_fwd(x: torch.Tensor, nw: torch.Tensor, eps: float, d: int, dt: torch.dtype):
    """``(h, rstd)``: ``h = x / rms(x) * nw`` over groups of ``d`` channels, in ``dt``."""
    xg = x.to(_compute_dtype(x)).unflatten(-1, (-1, d))  # [..., C // d, d]
    rstd = torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return (xg * rstd * nw.to(xg.dtype)).flatten(-2).to(dt), rstd


@fused
def _norm_apply(x: torch.Tensor, rstd: torch.Tensor, nw: torch.Tensor, d: int, dt: torch.dtype):
    """``h`` again from ``x`` and the saved ``rstd`` (backward)."""
    xg = x.to(rstd.dtype).unflatten(-1, (-1, d))
    return (xg * rstd * nw.to(rstd.dtype)).flatten(-2).to(dt)


@fused
def _norm_bwd(dh_parts: list, x: torch.Tensor, rstd: torch.Tensor, nw: torch.Tensor, d: int):
    """``(dx, dnw)`` from the projections' input gradients (summed in float32)."""
    ct = rstd.dtype
    dh = dh_parts[0].to(ct)
    for part in dh_parts[1:]:  # like autograd: each linear's input grad, summed
        dh = dh + part.to(ct)
    xhat = x.to(ct).unflatten(-1, (-1, d)) * rstd
    dhg = dh.unflatten(-1, (-1, d))
    dnw = (dhg * xhat).reshape(-1, d).sum(0)
    g = dhg * nw.to(ct)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))  # as in _RMSNormFn
    return dx.flatten(-2).to(x.dtype), dnw.to(nw.dtype)


def _project(h: torch.Tensor, weights) -> tuple:
    """``tuple(h @ w.T for w in weights)`` in ``h``'s dtype (the autocast dtype under autocast: no
    second cast)."""
    with torch.autocast(h.device.type, enabled=False):
        return tuple(F.linear(h, w.to(h.dtype)) for w in weights)


class _RMSNormLinearFn(torch.autograd.Function):
    """``[rmsnorm(x) @ W_i.T for W_i in weights]`` with the norm over groups of ``d`` channels.

    Saves ``x``, ``1/rms`` and the weights, and recomputes the normalised input in backward: the
    separate norm + linears would also keep that input (one ``[tokens, C]`` tensor per norm).
    The function itself is never traced by ``torch.compile`` (whose partitioner kept the
    normalised input as well: +2 KB per token per call at width 1024, three calls per layer);
    its elementwise parts run compiled (``compile``) and the matmuls eagerly."""

    @staticmethod
    def forward(ctx, x, norm_weight, eps: float, d: int, compile: bool, *weights):
        dt = _output_dtype(x)
        h, rstd = compiled_or_eager(_norm_fwd, compile)(x, norm_weight, eps, d, dt)
        ctx.save_for_backward(x, norm_weight, rstd, *weights)
        ctx.d, ctx.dt, ctx.compile = d, dt, compile
        return _project(h, weights)

    @staticmethod
    def backward(ctx, *dys):
        x, norm_weight, rstd, *weights = ctx.saved_tensors
        dt = ctx.dt
        h = compiled_or_eager(_norm_apply, ctx.compile)(x, rstd, norm_weight, ctx.d, dt)
        h2 = h.reshape(-1, h.shape[-1])
        parts, dws = [], []
        for dy, w in zip(dys, weights):
            if dy is None:
                dws.append(None)
                continue
            dy = dy.to(dt)
            parts.append(dy @ w.to(dt))
            dws.append((dy.reshape(-1, dy.shape[-1]).t() @ h2).to(w.dtype))
        if not parts:
            return (None, None, None, None, None, *dws)
        dx, dnw = compiled_or_eager(_norm_bwd, ctx.compile)(parts, x, rstd, norm_weight, ctx.d)
        return (dx, dnw, None, None, None, *dws)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, weights, eps: float = 1e-6) -> tuple:
    """``h = rmsnorm(x) * norm_weight`` (over groups of ``norm_weight.numel()`` channels), then
    ``tuple(h @ w.T for w in weights)``, keeping only ``x`` for backward (``h`` is recomputed).

    Under autocast ``h`` and the outputs are in the autocast dtype (as ``rms_norm`` + ``nn.Linear``).
    On CUDA training calls the norm's elementwise parts run compiled (``_fused.py``).

    Example::

        >>> x, w = torch.randn(3, 8), torch.randn(5, 8)
        >>> (y,) = rms_norm_linear(x, torch.ones(8), [w])
        >>> torch.allclose(y, rms_norm(x, torch.ones(8)) @ w.t(), atol=1e-5)
        True
    """
    d = norm_weight.shape[-1]
    if x.shape[-1] % d:
        raise ValueError(f"x's last dim {x.shape[-1]} is not a multiple of norm_weight's size {d}")
    if inference_kernels(x) and _takes(d, x, norm_weight):  # no autograd: one Triton pass for the norm
        return _project(_glue().row_norm(x, d, weight=norm_weight, eps=eps, out_dtype=_output_dtype(x)), weights)
    return _RMSNormLinearFn.apply(x, norm_weight, eps, d, will_compile(x), *weights)


GATE_ACTIVATIONS = ("silu", "sigmoid")


@fused(inference=_gated_rms_norm_inference)
def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                   activation: str = "silu") -> torch.Tensor:
    """``rmsnorm(x) * act(gate)``, ``act`` = ``activation`` (``"silu"`` or ``"sigmoid"``), plain autograd."""
    ct = _compute_dtype(x)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(ct)
    g = gate.to(ct)
    return (y * (F.silu(g) if activation == "silu" else torch.sigmoid(g))).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension, computed in float32 (at least).

    With ``gate`` given, returns ``rmsnorm(x) * act(gate)`` (DeltaNet's output gate), ``act`` the
    ``gate_activation``: ``"silu"`` (default) or ``"sigmoid"``.

    Example::

        >>> norm = RMSNorm(8)
        >>> norm(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6, gate_activation: str = "silu"):
        super().__init__()
        if gate_activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate_activation must be one of {list(GATE_ACTIVATIONS)}, got {gate_activation!r}")
        self.eps, self.gate_activation = eps, gate_activation
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is None:
            return rms_norm(x, self.weight, self.eps)
        return gated_rms_norm(x, gate, self.weight, self.eps, self.gate_activation)

    def extra_repr(self) -> str:
        act = f", gate_activation={self.gate_activation}" if self.gate_activation != "silu" else ""
        return f"{self.weight.shape[0]}, eps={self.eps}{act}"
