"""``fused(fn)``: run ``fn`` through ``torch.compile`` for CUDA training calls, eagerly otherwise.

The layers' elementwise glue (short conv + SiLU, q/k norms, RMSNorm, SwiGLU) is ~10 eager
kernels per call, each a full pass over a ``[tokens, hidden]`` tensor; compiled it is one kernel
forward and one backward, with Inductor choosing what to keep for backward. Eager is kept for
CPU (compiling costs more than it saves on small CPU runs), for inference (no backward) and
inside an outer ``torch.compile`` (which fuses the same code itself).

Set ``DELTANET_DISABLE_FUSION=1`` to run everything eagerly (debugging, bisecting numerics).
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["fused", "recompute_in_backward", "will_compile"]


def _enabled() -> bool:
    return os.environ.get("DELTANET_DISABLE_FUSION", "") in ("", "0")


# Set while ``recompute_in_backward`` runs its function forward without autograd: that forward
# is part of a training step (same shapes every step), so it is compiled too.
_FORCE = False


def _compiles_on(x: torch.Tensor) -> bool:
    """The devices where fused functions run compiled (CUDA; tests widen it)."""
    return x.is_cuda


def _would_compile_outside(x: torch.Tensor) -> bool:
    """``will_compile`` without the outer-compile test: a CUDA training call (inside an outer
    ``torch.compile``, the layers use this to keep their Triton ops)."""
    return _compiles_on(x) and (torch.is_grad_enabled() or _FORCE) and _enabled()


def will_compile(x: torch.Tensor) -> bool:
    """Whether a ``fused`` function called with ``x`` first runs compiled."""
    return _would_compile_outside(x) and not torch.compiler.is_compiling()


# Every ``fused`` wrapper, so that tests can drop their compiled versions.
REGISTRY: list = []


def fused(fn):
    """Decorator: ``fn(*tensors, ...)`` compiled when its first argument is a CUDA tensor and
    autograd is recording (or inside the no-grad forward of ``recompute_in_backward``). The
    compiled version is created on first use and kept as ``wrapper.compiled``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if will_compile(args[0]):
            if wrapper.compiled is None:
                wrapper.compiled = torch.compile(fn)
            return wrapper.compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.eager = fn
    wrapper.compiled = None
    REGISTRY.append(wrapper)
    return wrapper


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_inputs: int, *args):
        inputs, params = args[:n_inputs], args[n_inputs:]
        dev = inputs[0].device.type
        ctx.fn, ctx.n_inputs, ctx.params = fn, n_inputs, params  # params: leaf tensors, held anyway
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(*inputs)
        global _FORCE
        force, _FORCE = _FORCE, True
        try:
            return tuple(fn(*inputs))
        finally:
            _FORCE = force

    @staticmethod
    def backward(ctx, *douts):
        dev, enabled, dtype = ctx.autocast
        inputs = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                  for t in ctx.saved_tensors]
        with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            outs = ctx.fn(*inputs)
        pairs = [(o, d) for o, d in zip(outs, douts) if d is not None and o.requires_grad]
        wrt = [t for t in (*inputs, *ctx.params) if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True)
                     if pairs else [None] * len(wrt))
        return (None, None, *(next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None
                              for t in (*inputs, *ctx.params)))


def recompute_in_backward(fn, inputs: tuple, params) -> tuple:
    """``fn(*inputs)`` (a tuple of tensors) keeping only ``inputs`` for backward; backward
    reruns ``fn`` under the forward's autocast state and differentiates the rerun. ``params``:
    the parameters ``fn`` uses (they receive gradients).

    Unlike ``torch.utils.checkpoint`` this does not compare the forward's saved tensors with the
    rerun's, so ``fn`` may run eagerly forward (no autograd) and compiled in backward.

    Example::

        >>> w = torch.nn.Parameter(torch.randn(3))
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> (y,) = recompute_in_backward(lambda a: ((a * w).sin(),), (x,), [w])
        >>> y.sum().backward(); w.grad.shape
        torch.Size([3])
    """
    return _Recompute.apply(fn, len(inputs), *inputs, *params)
