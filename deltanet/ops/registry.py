"""One helper that registers a Triton op as a pair of ``torch.library`` custom ops.

Every op (chunk delta rule, recurrent delta rule, short convolution) is a forward op and a
backward op, each with a fake (meta) implementation, and autograd linking them, so that
``torch.compile(fullgraph=True)`` traces through without graph breaks. The ops are named
``deltanet::<name>_fwd`` / ``deltanet::<name>_bwd``.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["empty_state", "register_autograd_op"]


def empty_state(x: torch.Tensor) -> torch.Tensor:
    """An absent optional output: custom ops return tensors, never None (0 elements, fp32)."""
    return x.new_empty(0, dtype=torch.float32)


def register_autograd_op(name: str, *, forward: Callable, forward_fake: Callable, backward: Callable,
                         backward_fake: Callable, setup_context: Callable, grads: Callable):
    """Register ``forward`` / ``backward`` (type-annotated functions: the schema is inferred)
    with their fakes; ``grads(ctx, bwd_op, *output_grads)`` returns the input gradients,
    calling the registered backward op. Returns ``(fwd_op, bwd_op)``."""
    fwd = torch.library.custom_op(f"deltanet::{name}_fwd", forward, mutates_args=())
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(f"deltanet::{name}_bwd", backward, mutates_args=())
    bwd.register_fake(backward_fake)
    fwd.register_autograd(lambda ctx, *out_grads: grads(ctx, bwd, *out_grads), setup_context=setup_context)
    return fwd, bwd
