"""SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``.

The product and the down projection are one ``autograd.Function`` that keeps only the two
projections ``gate(x)`` and ``up(x)`` and recomputes ``silu(g) * u`` in backward. Plain autograd
would also keep ``silu(g)`` and the product: two more ``[tokens, intermediate]`` tensors per
layer (~9 GB for a 24-layer 340M model at 32K tokens). On CUDA, training calls are compiled
(``_fused.py``), which fuses the elementwise part of both directions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._fused import fused
from .norm import rms_norm_linear

__all__ = ["SwiGLU", "swiglu_linear"]


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        return F.linear(F.silu(g) * u, weight.to(g.dtype))

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        w = weight.to(g.dtype)
        dy = dy.to(g.dtype)
        sg = torch.sigmoid(g)
        silu = g * sg
        dp = dy @ w  # [..., intermediate]
        dw = dy.reshape(-1, dy.shape[-1]).t() @ (silu * u).reshape(-1, g.shape[-1])
        du = dp * silu
        dg = dp * u * sg * (1 + g * (1 - sg))  # d silu(g) / dg = sigmoid(g) (1 + g (1 - sigmoid(g)))
        return dg, du, dw.to(weight.dtype)


@fused
def swiglu_linear(g: torch.Tensor, u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(silu(g) * u) @ weight.T`` with a recomputing backward.

    Example::

        >>> g, u, w = torch.randn(3, 8), torch.randn(3, 8), torch.randn(4, 8)
        >>> torch.allclose(swiglu_linear(g, u, w), (torch.nn.functional.silu(g) * u) @ w.t(), atol=1e-6)
        True
    """
    return _SwiGLULinear.apply(g, u, weight)


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

    def forward(self, x: torch.Tensor, norm=None, residual: torch.Tensor | None = None,
                fused_decode: bool = False) -> torch.Tensor:
        """``norm``: an :class:`~deltanet.layers.RMSNorm` applied to ``x`` first, fused with the
        gate/up projections so that its output is not kept for backward; ``residual``: returns
        ``residual + mlp(x)``. ``fused_decode`` (a decode step's few rows, no autograd): two Triton
        kernels, norm + gate/up + ``silu(g) * u``, then down + residual
        (:mod:`deltanet.ops.decode_linear`)."""
        if fused_decode:
            from ..ops.decode_linear import linear_residual_decode, rms_norm_swiglu_decode

            p = rms_norm_swiglu_decode(x, norm.weight if norm is not None else None, self.gate_proj.weight,
                                       self.up_proj.weight, norm.eps if norm is not None else 0.0)
            return linear_residual_decode(p, self.down_proj.weight, residual)
        if norm is not None:
            g, u = rms_norm_linear(x, norm.weight, [self.gate_proj.weight, self.up_proj.weight], norm.eps)
            y = swiglu_linear(g, u, self.down_proj.weight)
        else:
            y = swiglu_linear(self.gate_proj(x), self.up_proj(x), self.down_proj.weight)
        return y if residual is None else residual + y
