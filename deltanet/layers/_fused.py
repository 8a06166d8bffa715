"""``fused(fn)``: run ``fn`` through ``torch.compile`` for CUDA training calls, eagerly otherwise.

The layers' elementwise glue (short conv + SiLU, q/k norms, RMSNorm, SwiGLU) is ~10 eager
kernels per call, each a full pass over a ``[tokens, hidden]`` tensor; compiled it is one kernel
forward and one backward, with Inductor choosing what to keep for backward. Eager is kept for
CPU (compiling costs more than it saves on small CPU runs) and inside an outer ``torch.compile``
(which fuses the same code itself). CUDA inference calls (no autograd: a prefill, scoring) take
forward-only Triton kernels instead (``inference_kernels``, :mod:`deltanet.ops.glue`): one pass
each, no compilation for every new prompt length.

Set ``DELTANET_DISABLE_FUSION=1`` to run everything eagerly (debugging, bisecting numerics).
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = ["RecomputedRegion", "compiled_or_eager", "fused", "inference_kernels", "recompute_in_backward", "will_compile"]


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


def _infers_on(x: torch.Tensor) -> bool:
    """The devices where inference calls take the forward-only Triton kernels (CUDA; tests widen
    it to CPU tensors, which the Triton interpreter runs)."""
    return x.is_cuda


_GLUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def inference_kernels(x: torch.Tensor) -> bool:
    """Whether a call of the glue with ``x`` takes the forward-only Triton kernels
    (:mod:`deltanet.ops.glue`, one pass each): a CUDA call without autograd (a prefill, scoring,
    evaluation), except the no-grad forward of a training recompute (compiled, like its rerun in
    backward) and calls inside an outer ``torch.compile`` (which fuses the code itself)."""
    return (_infers_on(x) and not torch.is_grad_enabled() and not _FORCE and x.dtype in _GLUE_DTYPES
            and _enabled() and not torch.compiler.is_compiling())


# Every ``fused`` wrapper, so that tests can drop their compiled versions.
REGISTRY: list = []

# Variants a fused function legitimately compiles in one process: input dtypes, autocast on/off,
# grad mode (training vs the recompute forward), the norm sizes and the number of projections a
# norm feeds (``norm._norm_bwd``). Dynamo's default limit (8 per function) is reached by a process
# that runs both precision regimes (benchmarks, a test session), after which the function runs
# eagerly for good: slower, silently. Raised (never lowered) when the first fused function compiles.
RECOMPILE_LIMIT = 64


def _compile(fn):
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
    return torch.compile(fn)


def fused(fn=None, *, inference=None):
    """Decorator: ``fn(*tensors, ...)`` compiled when its first argument is a CUDA tensor and
    autograd is recording (or inside the no-grad forward of ``recompute_in_backward``). The
    compiled version is created on first use and kept as ``wrapper.compiled``.

    ``inference``: a function of the same arguments for the calls ``inference_kernels`` picks (the
    forward-only Triton kernels); it returns ``NotImplemented`` for a call it does not take, which
    then runs ``fn`` eagerly. Kept as ``wrapper.inference``."""
    if fn is None:
        return functools.partial(fused, inference=inference)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if will_compile(args[0]):
            if wrapper.compiled is None:
                wrapper.compiled = _compile(fn)
            return wrapper.compiled(*args, **kwargs)
        if wrapper.inference is not None and inference_kernels(args[0]):
            out = wrapper.inference(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return fn(*args, **kwargs)

    wrapper.eager = fn
    wrapper.compiled = None
    wrapper.inference = inference
    REGISTRY.append(wrapper)
    return wrapper


def compiled_or_eager(wrapper, compile: bool):
    """The compiled (``compile``) or eager version of a ``fused`` function, whatever the autograd
    state: for autograd-free parts called inside an ``autograd.Function``'s forward / backward,
    which decides at its own call (``will_compile``) so that ``torch.compile`` never traces the
    Function and its partitioner cannot add to what the Function saves."""
    if not compile:
        return wrapper.eager
    if wrapper.compiled is None:
        wrapper.compiled = _compile(wrapper.eager)
    return wrapper.compiled


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


class _RegionFn(torch.autograd.Function):
    """The region's own autograd node: forward without autograd (compiled on CUDA, as in
    ``_Recompute``), backward through the region's rerun (shared with the consumers' unpacks)."""

    @staticmethod
    def forward(ctx, region, n_inputs: int, *args):
        ctx.region, ctx.n_inputs = region, n_inputs
        global _FORCE
        force, _FORCE = _FORCE, True
        try:
            return tuple(region._fn(*args[:n_inputs]))
        finally:
            _FORCE = force

    @staticmethod
    def backward(ctx, *douts):
        region = ctx.region
        inputs, outs = region._rerun()
        region._graph = None  # consumed: a later backward (retain_graph) reruns
        pairs = [(o, d) for o, d in zip(outs, douts) if d is not None and o.requires_grad]
        wrt = [t for t in (*inputs, *region._params) if isinstance(t, torch.Tensor) and t.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [d for _, d in pairs], allow_unused=True)
                     if pairs else [None] * len(wrt))
        return (None, None, *(next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None
                              for t in (*inputs, *region._params)))


def _active_saved_tensors_hooks():
    """``(pack, unpack)`` of the innermost active saved-tensor hooks, or None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(True) if top is not None else None


class _Packed:
    """A tensor packed by saved-tensor hooks ``(pack, unpack)``."""

    __slots__ = ("_unpack", "_packed", "requires_grad")

    def __init__(self, hooks, t: torch.Tensor):
        self._unpack, self._packed, self.requires_grad = hooks[1], hooks[0](t), t.requires_grad

    def unpack(self) -> torch.Tensor:
        """The tensor again, detached, with its ``requires_grad`` at packing (a checkpoint's
        unpack returns its recomputed value without it)."""
        return self._unpack(self._packed).detach().requires_grad_(self.requires_grad)


class RecomputedRegion:
    """``fn(*inputs)`` whose outputs nobody keeps for backward: the region itself keeps only its
    inputs (as ``recompute_in_backward``), and inside :meth:`consumers` every tensor a later op
    saves that is (a view of) one of the outputs is replaced by a recipe, rerun on unpack.

    For the DeltaNet mixer: q, k, v after the short conv and the q/k norm are saved by the delta
    rule; this keeps the conv inputs instead and reruns conv + norm (memory-bound, one pass) in
    backward. The rerun runs the same code under the same autocast state (eagerly: the same
    values; on CUDA the compiled training version of the code the forward ran compiled for
    inference, equal up to rounding, as with ``recompute_in_backward``). One rerun, with autograd,
    serves the consumers' unpacks and then the region's own backward, which frees it.

    Example::

        >>> w = torch.nn.Parameter(torch.randn(3))
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> region = RecomputedRegion(lambda a: ((a * w).sin(),), (x,), [w])
        >>> (y,) = region.outputs
        >>> with region.consumers():
        ...     z = y.exp()            # exp saves its output, not y: unaffected
        ...     u = y * y              # saves y twice: two recipes
        >>> (z.sum() + u.sum()).backward(); x.grad.shape
        torch.Size([4, 3])
    """

    def __init__(self, fn, inputs: tuple, params):
        self._fn, self._params = fn, list(params)
        # The inputs are what the region keeps for backward: they go through the saved-tensor
        # hooks active here (``save_on_cpu``, a checkpoint around the region, a saved-bytes count)
        # like any tensor an autograd node saves.
        hooks = _active_saved_tensors_hooks()
        self._inputs = [_Packed(hooks, t) if hooks is not None and isinstance(t, torch.Tensor) else t
                        for t in inputs]
        dev = inputs[0].device.type
        self._autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        self._graph = None  # (inputs, outputs) of the rerun with autograd, between unpack and backward
        self._outer = None  # saved-tensor hooks active outside consumers()
        outs = _RegionFn.apply(self, len(inputs), *inputs, *self._params)
        self._keys = [(o.untyped_storage().data_ptr(), o.dtype) for o in outs]
        self.outputs = outs  # the caller's; the region drops them in consumers()

    def _rerun(self) -> tuple:
        """``fn`` again on the saved inputs, with autograd (the region's backward differentiates
        this graph; the consumers' unpacks read its outputs, so one rerun serves both)."""
        if self._graph is None:
            dev, enabled, dtype = self._autocast
            inputs = [t.unpack() if isinstance(t, _Packed)
                      else t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                      for t in self._inputs]
            with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                self._graph = (inputs, tuple(self._fn(*inputs)))
        return self._graph

    def _pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if t.numel() == 0 or key not in self._keys:
            if self._outer is not None:  # hooks outside (e.g. a saved-bytes count) see the rest
                return ("outer", self._outer[1], self._outer[0](t))
            return t
        return ("recipe", self, self._keys.index(key), tuple(t.shape), t.stride(), t.storage_offset())

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if packed[0] == "outer":
            return packed[1](packed[2])
        _, region, i, shape, stride, offset = packed
        return region._rerun()[1][i].detach().as_strided(shape, stride, offset)

    @contextlib.contextmanager
    def consumers(self):
        """Ops run inside save recipes instead of the region's outputs. Inside an outer
        ``torch.compile`` (which picks what to save itself) this does nothing."""
        if torch.compiler.is_compiling():
            yield
            return
        self.outputs = None  # the recipes must not keep the outputs alive
        self._outer = _active_saved_tensors_hooks()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._outer = None
