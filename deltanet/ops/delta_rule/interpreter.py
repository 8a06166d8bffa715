"""Fixes for Triton interpreter bugs (``TRITON_INTERPRET=1``: the kernels on CPU, as in CI).

Kept apart from the launchers: nothing here runs on a GPU. Importing this module applies the
fixes once when the kernels were built for the interpreter (``interpreted()``); every launcher
module imports it.
"""

from __future__ import annotations

import triton.language as tl

from .kernels.wy import wy_fwd_kernel

__all__ = ["apply_fixes", "interpreted"]


def interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return type(wy_fwd_kernel).__name__ == "InterpretedFunction"


def apply_fixes() -> None:
    """Work around Triton interpreter bugs (3.6 – 3.9) the kernels would hit on CPU.

    1. Scalars are 1-element arrays converted with ``int(array)``, which numpy >= 2.4 rejects
       for ndim > 0: a tensor as a ``range`` bound (the chunk loops) fails. ``__index__`` is
       made to read the single element.
    2. ``tl.dot`` on bfloat16 operands multiplies their raw uint16 storage (garbage results);
       bfloat16 operands are widened to float32 first (exact: bf16 is truncated fp32).
    3. (3.9) A comparison of two scalars holds int32 data, so ``vector_mask & (t >= 0)`` is an
       int32 mask that loads and stores reject ("mask has unsupported dtype"); masks are made
       boolean before the load or store.
    4. ``x.to(tl.bfloat16)`` of float32 truncates the mantissa, where the GPU rounds to nearest
       even (as PyTorch does): kernels that round intermediates to bf16 on purpose (the fused
       decode step reproduces the eager layer's roundings) would disagree by one bf16 ulp. The
       float32 -> bfloat16 cast rounds to nearest even here too.
    """
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_deltanet_compat", False):
        return

    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(x):
            if x.dtype.scalar == tl.bfloat16:
                data = (x.data.astype(np.uint32) << 16).view(np.float32)
                return interpreter.TensorHandle(data, tl.float32)
            return x
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot

    def boolean(mask):
        if mask.data.dtype != np.bool_:
            return interpreter.TensorHandle(mask.data.astype(np.bool_), mask.dtype)
        return mask

    original_load = interpreter.InterpreterBuilder.create_masked_load
    original_store = interpreter.InterpreterBuilder.create_masked_store

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        return original_load(self, ptrs, boolean(mask), other, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        return original_store(self, ptrs, value, boolean(mask), *args, **kwargs)

    interpreter.InterpreterBuilder.create_masked_load = create_masked_load
    interpreter.InterpreterBuilder.create_masked_store = create_masked_store

    original_cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            import torch

            data = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.uint16).numpy()
            return interpreter.TensorHandle(data, dst_type.scalar)
        return original_cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._deltanet_compat = True
    interpreter._patch_lang_tensor = patched


if interpreted():
    apply_fixes()
