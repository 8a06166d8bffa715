"""SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``.

The product and the down projection are one ``autograd.Function`` that keeps only the two
projections ``gate(x)`` and ``up(x)`` and recomputes ``silu(g) * u`` in backward. Plain autograd
would also keep ``silu(g)`` and the product: two more ``[tokens, intermediate]`` tensors per
layer (~9 GB for a 24-layer 340M model at 32K tokens). On CUDA training calls run its
elementwise parts compiled (``_fused.py``: one kernel each way), the matmuls eagerly; inference
calls take one forward-only Triton kernel for the product (``deltanet.ops.glue``).

``SwiGLU(recompute=True)`` (``activation_checkpointing="mlp"``) keeps not even ``g`` and ``u``:
the norm and the gate/up projections are rerun in backward, the down projection is not.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._fused import RecomputedRegion, compiled_or_eager, fused, inference_kernels, will_compile
from .norm import rms_norm_linear

__all__ = ["SwiGLU", "swiglu_linear"]


@fused
def _swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


@fused
def _swiglu_bwd(dp: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple:
    """``(silu(g) * u, dg, du)`` from ``dp``, the gradient of ``silu(g) * u``."""
    sg = torch.sigmoid(g)
    silu = g * sg
    dg = dp * u * sg * (1 + g * (1 - sg))  # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
    return silu * u, dg, dp * silu


class _SwiGLULinear(torch.autograd.Function):
    """Saves ``g``, ``u`` and the weight only. Never traced by ``torch.compile`` (as
    ``norm._RMSNormLinearFn``): its elementwise parts run compiled (``compile``), the matmuls
    eagerly, so that saved-tensor hooks (``RecomputedRegion.consumers``) see ``g`` and ``u``
    themselves, not whatever a partitioner would keep."""

    @staticmethod
    def forward(ctx, g, u, weight, compile: bool):
        ctx.save_for_backward(g, u, weight)
        ctx.compile = compile
        return F.linear(compiled_or_eager(_swiglu, compile)(g, u), weight.to(g.dtype))

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        dy = dy.to(g.dtype)
        dp = dy @ weight.to(g.dtype)  # [..., intermediate]
        p, dg, du = compiled_or_eager(_swiglu_bwd, ctx.compile)(dp, g, u)
        dw = dy.reshape(-1, dy.shape[-1]).t() @ p.reshape(-1, g.shape[-1])
        return dg, du, dw.to(weight.dtype), None


def swiglu_linear(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(silu(g) * u) @ weight.T`` with a recomputing backward.

    Example::

        >>> g, u, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 8)
        >>> torch.allclose(swiglu_linear(g, u, w), (torch.nn.functional.silu(g) * u) @ w.t(), atol=1e-6)
        True
    """
    if inference_kernels(g) and u.dtype == g.dtype and u.shape == g.shape:  # no autograd: one Triton pass
        from ..ops.glue import swiglu

        return F.linear(swiglu(g, u), weight.to(g.dtype))
    return _SwiGLULinear.apply(g, u, weight, will_compile(g))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020), no biases.

    Example::

        >>> mlp = SwiGLU(16, 48)
        >>> mlp(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def gate_up(self, x: torch.Tensor, norm=None) -> tuple:
        """``(gate(h), up(h))`` with ``h = norm(x)`` (``x`` without a norm); the norm fused with
        the projections (:func:`~deltanet.layers.norm.rms_norm_linear`)."""
        if norm is not None:
            return rms_norm_linear(x, norm.weight, [self.gate_proj.weight, self.up_proj.weight], norm.eps)
        return self.gate_proj(x), self.up_proj(x)

    def forward(self, x: torch.Tensor, norm=None, residual: torch.Tensor | None = None,
                fused_decode: bool = False, recompute: bool = False) -> torch.Tensor:
        """``norm``: an :class:`~deltanet.layers.RMSNorm` applied to ``x`` first, fused with the
        gate/up projections so that its output is not kept for backward; ``residual``: returns
        ``residual + mlp(x)``. ``fused_decode`` (a decode step's few rows, no autograd): two Triton
        kernels, norm + gate/up + ``silu(g) * u``, then down + residual
        (:mod:`deltanet.ops.decode_linear`).

        ``recompute`` (training): keep only ``x`` for backward; backward reruns the norm and the
        gate/up projections (two of the three GEMMs: the down projection's output is never needed
        again) and the elementwise part (a :class:`~deltanet.layers._fused.RecomputedRegion`)."""
        if fused_decode:
            from ..ops.decode_linear import linear_residual_decode, rms_norm_swiglu_decode

            p = rms_norm_swiglu_decode(x, norm.weight if norm is not None else None, self.gate_proj.weight,
                                       self.up_proj.weight, norm.eps if norm is not None else 0.0)
            return linear_residual_decode(p, self.down_proj.weight, residual)
        if recompute and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            params = [self.gate_proj.weight, self.up_proj.weight] + ([norm.weight] if norm is not None else [])
            region = RecomputedRegion(lambda xi: self.gate_up(xi, norm), (x,), params)
            g, u = region.outputs
            with region.consumers():
                y = swiglu_linear(g, u, self.down_proj.weight)
        else:
            y = swiglu_linear(*self.gate_up(x, norm), self.down_proj.weight)
        return y if residual is None else residual + y
