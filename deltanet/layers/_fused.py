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

__all__ = ["fused", "will_compile"]


def _enabled() -> bool:
    return os.environ.get("DELTANET_DISABLE_FUSION", "") in ("", "0")


def will_compile(x: torch.Tensor) -> bool:
    """Whether a ``fused`` function called with ``x`` first runs compiled."""
    return (x.is_cuda and torch.is_grad_enabled() and _enabled()
            and not torch.compiler.is_compiling())


def fused(fn):
    """Decorator: ``fn(*tensors, ...)`` compiled when its first argument is a CUDA tensor and
    autograd is recording. The compiled version is created on first use."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        x = args[0]
        if will_compile(x):
            if compiled is None:
                compiled = torch.compile(fn)
            return compiled(*args, **kwargs)
        return fn(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
