"""Causal depthwise short convolution with a decode state and document boundaries.

``y_t = sum_{s=0}^{W-1} w[:, W-1-s] * x_{t-s}``: each channel mixes its last ``W`` inputs
(``W = 4`` in DeltaNet). Written as ``W`` shifted multiply-adds instead of ``F.conv1d``: it
keeps the ``[B, T, C]`` layout (no transposes), takes a cached prefix for decoding, and drops
the terms that would reach across a document boundary of a packed batch by masking each shift.
Accumulation is in float32 (at least).

On CUDA, training calls (autograd recording, or the no-grad forward of a recomputed region)
run the Triton kernels of ``deltanet/ops/short_conv.py``: one pass over memory forward, one
backward, keeping only the input for backward. Eager PyTorch would run ~10 elementwise kernels
per convolution (and keep their inputs); ``torch.compile`` of this code (``_fused.py``), the path
before, measured ~5x the memory-bound time on an H200. The compiled path stays where Triton is
not installed, with ``DELTANET_CONV=torch`` (A/B benchmarks) and for float64. An outer
``torch.compile`` of a CUDA training step traces through the Triton ops (``torch.library``);
compiled inference traces the plain PyTorch code.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.packing import PackedSequences, positions_in_documents
from . import _fused as _fused_mod
from ._fused import fused, will_compile

__all__ = ["ShortConvolution", "causal_conv", "conv_step", "positions_in_documents"]


def causal_conv(xe: torch.Tensor, weight: torch.Tensor, doc_pos: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """``xe: [B, W-1+T, C]`` (the ``W - 1`` previous inputs, then the ``T`` new ones),
    ``weight: [C, W]``, ``doc_pos: [T]`` positions inside documents or None -> ``[B, T, C]``.

    Example::

        >>> x = torch.randn(1, 3 + 5, 2)
        >>> causal_conv(x, torch.ones(2, 4), None, silu=False).shape
        torch.Size([1, 5, 2])
    """
    W = weight.shape[1]
    T = xe.shape[1] - (W - 1)
    ct = torch.promote_types(xe.dtype, torch.float32)
    w = weight.to(ct)
    y = xe[:, W - 1:].to(ct) * w[:, W - 1]
    for s in range(1, W):
        term = xe[:, W - 1 - s: W - 1 - s + T].to(ct) * w[:, W - 1 - s]
        if doc_pos is not None:
            term = term * (doc_pos[None, :, None] >= s)  # x_{t-s} belongs to an earlier document
        y = y + term
    if silu:
        y = F.silu(y)
    return y.to(xe.dtype)


def conv_step(xe: torch.Tensor, weight: torch.Tensor, silu: bool) -> torch.Tensor:
    """``causal_conv`` for one new token (``xe: [B, W, C]``, no document boundaries) as one
    contraction: the decoding path, where every saved kernel launch counts (``causal_conv`` is
    ~3 W small ops). Returns ``[B, 1, C]``.

    Example::

        >>> xe, w = torch.randn(2, 4, 3), torch.randn(3, 4)
        >>> torch.allclose(conv_step(xe, w, True), causal_conv(xe, w, None, True), atol=1e-6)
        True
    """
    ct = torch.promote_types(xe.dtype, torch.float32)
    y = torch.einsum("bwc,cw->bc", xe.to(ct), weight.to(ct)).unsqueeze(1)
    if silu:
        y = F.silu(y)
    return y.to(xe.dtype)


@fused
def _padded_conv(x, weight, doc_pos, silu: bool):
    return causal_conv(F.pad(x, (0, 0, weight.shape[1] - 1, 0)), weight, doc_pos, silu)


class _RecomputedConv(torch.autograd.Function):
    """``_padded_conv`` that keeps only its input and weight for backward and reruns the same
    code there: eager autograd would keep ~5 float32 ``[B, T, C]`` intermediates per conv
    (the shifted terms, the pre-activation and its SiLU)."""

    @staticmethod
    def forward(ctx, x, weight, doc_pos, silu: bool):
        ctx.save_for_backward(x, weight, doc_pos)
        ctx.silu = silu
        return _padded_conv.eager(x, weight, doc_pos, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, doc_pos = ctx.saved_tensors
        with torch.enable_grad():
            xr, wr = x.detach().requires_grad_(), weight.detach().requires_grad_()
            y = _padded_conv.eager(xr, wr, doc_pos, ctx.silu)
            dx, dw = torch.autograd.grad(y, (xr, wr), dy)
        return dx, dw, None, None


_BACKENDS = ("triton", "torch")


def _conv_backend() -> str:
    """``DELTANET_CONV``: ``triton`` (default) or ``torch`` (the compiled PyTorch code)."""
    backend = os.environ.get("DELTANET_CONV", "") or "triton"
    if backend not in _BACKENDS:
        raise ValueError(f"DELTANET_CONV must be one of {_BACKENDS} (or unset), got {backend!r}")
    return backend


_KERNELS = None  # the resolved import: the module deltanet.ops.short_conv, or False without Triton


def _triton_kernels():
    """The module ``deltanet.ops.short_conv``, or None where Triton is not installed (macOS,
    Windows): ``padded_conv`` then keeps the compiled path. (A module-level memo, not
    ``functools.cache``, which torch.compile would trace around with a warning.)"""
    global _KERNELS
    if _KERNELS is None:
        try:
            from ..ops import short_conv as kernels
        except ModuleNotFoundError as e:
            if e.name is None or e.name.split(".")[0] != "triton":
                raise
            kernels = False
        _KERNELS = kernels
    return _KERNELS or None


def _triton_short_conv():
    """``deltanet.ops.short_conv.short_conv``, or None without Triton."""
    kernels = _triton_kernels()
    return kernels.short_conv if kernels is not None else None


def _triton_route(x, weight):
    """The Triton ``short_conv`` if it takes this call (the dtypes and kernel sizes its kernels
    take), else None."""
    if _conv_backend() != "triton":
        return None
    kernels = _triton_kernels()
    if kernels is None or weight.shape[1] > kernels.MAX_W:
        return None
    if x.dtype not in kernels.DTYPES or weight.dtype not in kernels.DTYPES:
        return None  # float64: the PyTorch code keeps its float64 accumulation
    return _triton_short_conv()


def padded_conv(x, weight, doc_pos, silu: bool):
    """``causal_conv`` of ``x`` after ``W - 1`` zeros, for training, scoring and prefill: the Triton
    kernels (or the compiled PyTorch code for training) on CUDA, elsewhere with a backward that
    recomputes the conv.

    Example::

        >>> x = torch.randn(1, 5, 2, requires_grad=True)
        >>> torch.allclose(padded_conv(x, torch.ones(2, 4), None, True), _padded_conv(x, torch.ones(2, 4), None, True))
        True
    """
    compiling = will_compile(x) or torch.compiler.is_compiling()
    if compiling or not torch.is_grad_enabled():
        # CUDA training takes the Triton kernels, also inside an outer torch.compile of the step:
        # they are torch.library ops, so it traces through them (Inductor's own code for this
        # conv is ~4x slower); compiled inference traces the PyTorch code. CUDA inference without
        # a compile (a prefill, scoring) takes the Triton forward kernel: one pass.
        takes = _fused_mod._would_compile_outside(x) if compiling else _fused_mod.inference_kernels(x)
        short_conv = _triton_route(x, weight) if takes else None
        if short_conv is not None:
            return short_conv(x, weight, doc_pos, silu)
        return _padded_conv(x, weight, doc_pos, silu)
    return _RecomputedConv.apply(x, weight, doc_pos, silu)


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time, ``[B, T, C] -> [B, T, C]``, optional SiLU.

    ``forward(x, state=None, cu_seqlens=None, output_state=False)``; ``state`` is the previous
    ``W - 1`` inputs ``[B, W-1, C]`` (decoding); ``cu_seqlens``: packed documents, a tensor or a
    :class:`~deltanet.ops.packing.PackedSequences` (whose positions in documents are computed once
    per batch, not once per conv). Returns ``(y, new_state)``.

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
        silu = self.activation == "silu"
        if isinstance(cu_seqlens, PackedSequences):
            doc_pos = PackedSequences.from_cu_seqlens(cu_seqlens, T).positions  # (checks its length)
        else:
            doc_pos = positions_in_documents(cu_seqlens, T) if cu_seqlens is not None else None
        if state is None:
            # training / scoring, and a fresh prefill: the same conv (on CUDA one Triton kernel, with
            # or without autograd; the eager causal_conv below makes ~3 W float32 passes over
            # [B, T, C]), then its last W - 1 inputs as the state
            y = padded_conv(x, self.weight, doc_pos, silu)
            if not output_state:
                return y, None
            # a copy, not a view: a view of the prompt's input would keep all of it alive in the cache
            tail = x[:, T - (W - 1):] if T >= W - 1 else F.pad(x, (0, 0, W - 1 - T, 0))
            return y, tail.clone()
        xe = torch.cat([state.to(x.dtype), x], dim=1)  # [B, W-1+T, C]
        if T == 1 and doc_pos is None:  # decoding: one contraction instead of ~3 W small ops
            y = conv_step(xe, self.weight, silu)
        else:
            y = causal_conv(xe, self.weight, doc_pos, silu)
        # a copy, not a view: a view of the prompt's [B, W-1+T, C] input would keep all of it
        # alive in the cache (3 per layer: 9.7 GB after a 32 x 2K prefill of the 340M model)
        return y, (xe[:, -(W - 1):].clone() if output_state else None)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, activation={self.activation}"
