"""Softmax cross-entropy rows turned into their gradient in place: one Triton kernel.

The fused linear cross-entropy (``deltanet.models.loss``) computes the logits of a chunk of tokens,
their loss, and ``d loss / d logits`` right away. In PyTorch that last step is a float32 copy of the
logits plus ~8 elementwise passes over ``[chunk, vocab]`` (max, subtract, exp, sum, divide, scatter,
scale, cast); here one program per row reads the row twice (an online max / sum-of-exp pass, then
the gradient pass) and writes the gradient over the logits, in their dtype:

    loss_i = logsumexp(z_i) - z_i[y_i]
    z_i   <- (softmax(z_i) - onehot(y_i)) * scale        (scale = valid_i / count)

Rows whose label is ``ignore_index`` get a zero loss and a zero gradient. A label outside
``[0, vocab)`` (other than ``ignore_index``) makes that row's loss NaN: the kernel cannot raise
without a host synchronisation, and a NaN loss stops no one silently (the PyTorch path raises).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .delta_rule.interpreter import interpreted  # importing applies the interpreter fixes on CPU

__all__ = ["softmax_cross_entropy_grad_", "softmax_cross_entropy_grad_reference_"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_V = 4096  # vocabulary columns per loop step: 16 fp32 values a thread at 8 warps


@triton.jit
def _ce_grad_kernel(z, stride_z, labels, count, loss, V, ignore_index, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zr = z + row * stride_z
    y = tl.load(labels + row).to(tl.int64)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)
    yc = tl.where(valid & in_range, y, 0)
    target = tl.load(zr + yc).to(tl.float32)
    # pass 1: running max and sum of exp (float32 whatever the logits' dtype)
    o = tl.arange(0, BV)
    x = tl.load(zr + o, mask=o < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, 0)
    s = tl.sum(tl.exp(x - m), 0)
    for v0 in range(BV, V, BV):
        x = tl.load(zr + v0 + o, mask=v0 + o < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    row_loss = tl.where(valid, lse - target, 0.0)
    row_loss = tl.where(valid & ~in_range, float("nan"), row_loss)
    tl.store(loss + row, row_loss)
    # pass 2: the gradient over the logits. Every warp read the target logit above: the barrier
    # keeps any warp's gradient store from overwriting it first (a race the interpreter cannot show)
    tl.debug_barrier()
    scale = tl.where(valid, 1.0 / tl.load(count).to(tl.float32), 0.0)
    for v0 in range(0, V, BV):
        cols = v0 + o
        x = tl.load(zr + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == yc, 1.0, 0.0)
        tl.store(zr + cols, (g * scale).to(z.dtype.element_ty), mask=cols < V)


def _launch(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, ignore_index: int) -> torch.Tensor:
    N, V = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N:
        BV = min(BLOCK_V, triton.next_power_of_2(V))
        _ce_grad_kernel[(N,)](logits, logits.stride(0), labels, count, loss, V, ignore_index, BV=BV,
                              num_warps=8 if BV >= 2048 else 4)
    return loss


_op = torch.library.custom_op("deltanet::softmax_cross_entropy_grad_", _launch, mutates_args=("logits",))


@_op.register_fake
def _launch_fake(logits, labels, count, ignore_index):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def softmax_cross_entropy_grad_(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor,
                                ignore_index: int = -100) -> torch.Tensor:
    """Per-row loss ``logsumexp(logits_i) - logits_i[labels_i]`` (float32, ``[N]``; 0 where the label
    is ``ignore_index``), with ``logits`` ``[N, V]`` overwritten by ``(softmax - onehot) / count``
    (0 on ignored rows), in its own dtype. ``count``: a one-element tensor (the number of rows the
    mean is over; a tensor so that no host synchronisation is needed).

    The Triton kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.dtype not in DTYPES:
        raise TypeError(f"logits must be a float32, bfloat16 or float16 tensor [N, V], got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)} of shape {list(getattr(logits, 'shape', []))}")
    if not (logits.is_cuda or interpreted()):
        raise ValueError(f"logits must be a CUDA tensor (CPU tensors only under TRITON_INTERPRET=1), got "
                         f"{logits.device}; softmax_cross_entropy_grad_reference_ runs anywhere")
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        raise ValueError(f"logits must have V >= 1 contiguous columns, got shape {list(logits.shape)}, "
                         f"strides {logits.stride()}")
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64/int32 tensor [N] = {list(logits.shape[:1])}, got "
                         f"{labels.dtype} {list(labels.shape)}")
    if count.numel() != 1:
        raise ValueError(f"count must be a one-element tensor, got shape {list(count.shape)}")
    return _op(logits, labels.contiguous(), count.reshape(1), ignore_index)


def softmax_cross_entropy_grad_reference_(logits: torch.Tensor, labels: torch.Tensor, count: torch.Tensor,
                                          ignore_index: int = -100) -> torch.Tensor:
    """The same contract in PyTorch, any device and dtype (float64 stays float64): the loss rows in
    float32 at least, the gradient computed in that precision and written back into ``logits``.
    A label outside ``[0, V)`` raises (in ``gather``)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    valid = labels != ignore_index
    y = torch.where(valid, labels, 0)[:, None]
    z = logits.to(acc)  # a copy unless logits are float32 / float64: then in place
    target = z.gather(1, y)[:, 0]
    mx = z.amax(-1, keepdim=True)
    p = z.sub_(mx).exp_()
    se = p.sum(-1, keepdim=True)
    loss = (mx[:, 0] + se[:, 0].log() - target) * valid
    p.div_(se).scatter_add_(1, y, p.new_full(y.shape, -1.0))
    p.mul_((valid.to(acc) / count.to(acc))[:, None])
    if p.data_ptr() != logits.data_ptr():
        logits.copy_(p)
    return loss
