"""RMSNorm, and the gated RMSNorm used on DeltaNet's output (``rmsnorm(o) * silu(g)``)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm over the last dimension, computed in float32.

    With ``gate`` given, returns ``rmsnorm(x) * silu(gate)`` (DeltaNet's output gate).

    Example::

        >>> norm = RMSNorm(8)
        >>> norm(torch.randn(2, 3, 8)).shape
        torch.Size([2, 3, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        # float32 statistics at least: bf16 sums of squares lose digits at hidden sizes >= 1024
        ct = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(ct)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(ct)
        if gate is not None:
            y = y * F.silu(gate.to(ct))
        return y.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
