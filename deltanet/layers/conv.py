"""Causal depthwise short convolution with a decode state and document boundaries.

``y_t = sum_{s=0}^{W-1} w[:, W-1-s] * x_{t-s}``: each channel mixes its last ``W`` inputs
(``W = 4`` in DeltaNet). Written as ``W`` shifted multiply-adds instead of ``F.conv1d``: it
keeps the ``[B, T, C]`` layout (no transposes), takes a cached prefix for decoding, and drops
the terms that would reach across a document boundary of a packed batch by masking each shift.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShortConvolution", "positions_in_documents"]


def positions_in_documents(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """Index of each token inside its document, ``[T]`` (``cu_seqlens = [0, ..., T]``).

    Example::

        >>> positions_in_documents(torch.tensor([0, 3, 5]), 5)
        tensor([0, 1, 2, 0, 1])
    """
    pos = torch.arange(T, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)
    return pos - cu_seqlens.to(pos.dtype)[doc]


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time, ``[B, T, C] -> [B, T, C]``, optional SiLU.

    ``forward(x, state=None, cu_seqlens=None, output_state=False)``; ``state`` is the previous
    ``W - 1`` inputs ``[B, W-1, C]`` (decoding). Returns ``(y, new_state)``.

    Example::

        >>> conv = ShortConvolution(8, kernel_size=4)
        >>> y, state = conv(torch.randn(2, 5, 8), output_state=True)
        >>> y.shape, state.shape
        (torch.Size([2, 5, 8]), torch.Size([2, 3, 8]))
    """

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu"):
        super().__init__()
        if activation not in (None, "silu"):
            raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv1d's default for a depthwise kernel: U(-1/sqrt(W), 1/sqrt(W))
        bound = 1 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, state=None, cu_seqlens=None, output_state: bool = False):
        B, T, C = x.shape
        W = self.kernel_size
        if state is None:
            state = x.new_zeros(B, W - 1, C)
        xe = torch.cat([state.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
        doc_pos = positions_in_documents(cu_seqlens, T)[None, :, None] if cu_seqlens is not None else None
        w = self.weight.to(x.dtype)
        y = xe[:, W - 1:] * w[:, W - 1]
        for s in range(1, W):
            term = xe[:, W - 1 - s: W - 1 - s + T] * w[:, W - 1 - s]
            if doc_pos is not None:
                term = term * (doc_pos >= s)  # x_{t-s} belongs to an earlier document
            y = y + term
        if self.activation == "silu":
            y = F.silu(y)
        new_state = xe[:, -(W - 1):] if output_state else None
        return y, new_state

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}"
