"""Next-token cross-entropy fused with the output projection, in token chunks.

The plain path materialises ``[N, vocab]`` logits, a float32 copy and its gradient: at 32K
tokens and a 32K vocabulary that is ~12 GB, more than the rest of a 340M model's activations.
Here the logits of ``chunk_size`` tokens at a time are computed, turned into the loss and its
gradients immediately (the loss is a scalar, so d loss / d logits is known in the forward),
and dropped; only ``grad_hidden [N, D]`` and ``grad_weight [vocab, D]`` are kept for backward.
"""

from __future__ import annotations

import torch

from ..ops.cross_entropy import DTYPES, softmax_cross_entropy_grad_, softmax_cross_entropy_grad_reference_

__all__ = ["fused_linear_cross_entropy"]


# "auto": the Triton row kernel for CUDA tensors (float32 / bf16 / fp16), PyTorch otherwise;
# "triton" forces the kernel (tests, on CPU under TRITON_INTERPRET=1); "torch" forces PyTorch.
KERNEL = "auto"


def _use_kernel(logits: torch.Tensor) -> bool:
    return KERNEL != "torch" and logits.dtype in DTYPES and (KERNEL == "triton" or logits.is_cuda)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int):
        N = hidden.shape[0]
        valid = labels != ignore_index
        count = valid.sum().clamp_min(1)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                             device=weight.device) if need_w else None
        acc = torch.promote_types(hidden.dtype, torch.float32)  # float32 at least, float64 stays
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, N, chunk_size):
            h, y = hidden[s:s + chunk_size], labels[s:s + chunk_size]
            # One [c, vocab] logits buffer turned into the gradient in place: this runs at the end
            # of the forward, when every activation of the step is alive, so each extra buffer
            # of this size would raise the step's peak memory.
            logits = h @ weight.t()  # [c, vocab], the GEMM's dtype (bf16 under autocast)
            if _use_kernel(logits):
                rows = softmax_cross_entropy_grad_(logits, y, count, ignore_index)
            else:
                rows = softmax_cross_entropy_grad_reference_(logits, y, count, ignore_index)
            total += rows.sum().to(acc)
            g = logits.to(hidden.dtype)  # d loss / d logits = (softmax - onehot) * valid / count
            del logits
            if need_h:
                grad_h[s:s + chunk_size] = g @ weight
            if need_w:
                grad_w += (g.t() @ h).to(grad_w.dtype)
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               *, chunk_size: int = 2048, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, without storing the logits.

    Args:
        hidden: ``[N, D]``; weight: ``[vocab, D]``; labels: ``[N]`` in ``[0, vocab)`` or ``ignore_index``
            (skipped; the mean is over the other rows). Any other label is an error on the PyTorch
            path and a NaN loss on CUDA (the Triton row kernel, ``deltanet.ops.cross_entropy``,
            cannot raise without a host synchronisation).
        chunk_size: tokens per chunk; the loss and gradients do not depend on it beyond float
            rounding (the float32 logits of one chunk, ``[chunk_size, vocab]``, are the peak extra memory).

    Under autocast the chunk GEMMs run in the autocast dtype, as ``lm_head`` would; the softmax
    and the loss are float32 (float64 inputs stay float64). No label smoothing.

    Example::

        >>> h, w = torch.randn(10, 8, requires_grad=True), torch.randn(16, 8)
        >>> y = torch.randint(0, 16, (10,))
        >>> ref = torch.nn.functional.cross_entropy(h @ w.t(), y)
        >>> torch.allclose(fused_linear_cross_entropy(h, w, y, chunk_size=3), ref, atol=1e-5)
        True
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [vocab, D] must share D, got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must have shape [N] = {tuple(hidden.shape[:1])}, got {tuple(labels.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk_size, ignore_index)
