"""One-token decode steps replayed as a CUDA graph, for every layer mix.

A decode step of the 340M model is ~600 small kernels (24 layers of projections, convs, norms,
the recurrent update or attention on a batch of one token) whose launch cost, not their work,
sets the speed: eager decoding ran at 19–26 tokens/s at batch 1 on an H200. A captured step has
the same shapes and the same tensors every time, so one graph per generation replays the whole
step with a single launch.

How: the cache is put in its static form (:meth:`DeltaNetCache.make_static`): recurrent and conv
states are already fixed-size; attention layers get preallocated K/V (full attention, prompt +
reserve slots, grown by doubling when full) or a ring of ``sliding_window`` slots (sliding
attention), written in place at a device-side position, with a per-slot validity mask for left
padding; RoPE positions come from a device counter of real tokens per row. The first decode step
of a cache runs :meth:`DecodeGraph._step` eagerly (it compiles / warms every kernel and copies the
new recurrent states back into the cache's tensors, in place); the second step captures the same
function and replays it; later steps only replay. :meth:`DecodeGraph._step` is the one step
function: on the CPU (tests) it runs eagerly, on CUDA it is what the graph holds.

Each replay reads the token ids and the new token's padding mask from two static buffers (a
``head`` given to the graph, e.g. the token chooser of :mod:`deltanet.models.decoding`, writes the
next ids into the first inside the graph). Anything that swaps a cache tensor (a user assigning a
state, a full-attention cache growing) is noticed by identity and rebuilds the graph; beam
search's ``reorder_cache`` works in place and keeps it.

:func:`deltanet.models.decoding.decode` keeps a graph past its generation (with its cache) and
replays it for the next generation of the same key after refilling the cache in place;
:func:`step_settings` is the part of that key that describes the model and the switches.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import os
import time
import warnings
import weakref
from typing import Callable

import torch

from ..layers.delta_net import takes_fused_decode
from .cache import DeltaNetCache, RecurrentState

__all__ = ["DecodeGraph", "STEP_SWITCHES", "decode_step", "graph_decodable", "step_settings"]

# Devices on which the graph path is taken. Only CUDA captures; the tests add "cpu" to run the
# same static-buffer step eagerly (the bookkeeping is device independent).
GRAPH_DEVICES = ("cuda",)

# ``torch.cuda.graph`` empties the caching allocator before every capture (``empty_cache``: a
# ``cudaFree`` per cached block, each synchronising), which after a large prefill returns
# gigabytes of freed activations to the driver once per generation. The capture below skips it:
# the graph's private pool allocates beside the cache. True restores torch's behaviour (for A/B
# timing; ``DecodeGraph.timings`` splits a generation's setup into its parts).
EMPTY_CACHE_ON_CAPTURE = False

_CAPTURE_STREAMS: dict = {}

# Module-level switches that change what a captured decode step records (kernel routes, launch
# settings, the tests' poison flags). A decode graph kept for reuse (``decoding.decode``) is keyed
# by their values, so flipping one captures anew; ``tests/models/test_graph_reuse.py`` checks that
# every switch of this kind in the package is listed here.
STEP_SWITCHES = (
    ("deltanet.ops.pdl", "PDL_DECODE"),
    ("deltanet.ops.decode_linear", "SPLIT_K_BY_DEFAULT"),
    ("deltanet.ops.decode_linear", "MEASURED"),
    ("deltanet.ops.decode_linear", "POISON"),
    ("deltanet.ops.decode_attention", "FUSED_ATTENTION_BY_DEFAULT"),
    ("deltanet.ops.decode_attention", "POISON"),
    ("deltanet.ops.short_conv", "POISON"),
    ("deltanet.ops.delta_rule.chunk", "POISON"),
    ("deltanet.layers.delta_net", "FUSED_DECODE_BY_DEFAULT"),
)


def step_settings(model) -> tuple:
    """What a captured decode step of ``model`` depends on besides the cache and the head: the
    ``STEP_SWITCHES``, every layer's ``decode_kernel`` / ``backend`` attribute, the fusion
    environment switch, and the identity (address, dtype, shape) of every parameter and buffer
    (a graph replays fixed addresses: ``model.to(...)`` or reassigned weights need a new one)."""
    switches = []
    for module_name, name in STEP_SWITCHES:
        value = getattr(importlib.import_module(module_name), name)
        switches.append(tuple(sorted(value.items())) if isinstance(value, dict) else value)

    def plain(v):  # the key is hashed: anything but a plain value by its repr
        return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)

    routes = tuple((type(m).__name__, plain(getattr(m, "decode_kernel", None)), plain(getattr(m, "backend", None)))
                   for m in model.modules() if hasattr(m, "decode_kernel") or hasattr(m, "backend"))
    tensors = tuple((t.data_ptr(), t.dtype, tuple(t.shape))
                    for t in itertools.chain(model.parameters(), model.buffers()))
    return (tuple(switches), os.environ.get("DELTANET_DISABLE_FUSION", ""), routes, tensors)


@contextlib.contextmanager
def _capture(graph: "torch.cuda.CUDAGraph", device: torch.device):
    """``torch.cuda.graph(graph)`` without its ``empty_cache`` (unless ``EMPTY_CACHE_ON_CAPTURE``):
    capture on a side stream that first waits for the current one, which then waits for it."""
    if EMPTY_CACHE_ON_CAPTURE:
        with torch.cuda.graph(graph):
            yield
        return
    stream = _CAPTURE_STREAMS.get(device)
    if stream is None:
        stream = _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            yield
        finally:
            graph.capture_end()
    current.wait_stream(stream)


def graph_decodable(model, input_ids, cache, *, attention_mask, inputs_embeds, labels, position_ids, cu_seqlens,
                    output_hidden_states) -> bool:
    """Whether this ``forward`` is a one-token decode step the graph path can take (no host sync).
    Anything else, malformed input included, goes the eager way (which validates it)."""
    if not (model.cuda_graph_decoding and isinstance(cache, DeltaNetCache) and cache.seen_tokens > 0
            and isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[1] == 1
            and cache.ready):
        return False
    state = cache.tensors()[0]
    B = input_ids.shape[0]
    return (state.shape[0] == B and state.device == input_ids.device and input_ids.device.type in GRAPH_DEVICES
            and inputs_embeds is None and not input_ids.is_floating_point()
            and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
                                            and attention_mask.shape[0] == B
                                            and attention_mask.shape[1] in (1, cache.seen_tokens + 1)))
            and labels is None and position_ids is None
            and cu_seqlens is None and not output_hidden_states and not model.training
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


class DecodeGraph:
    """The decode step of one model on one (static) cache: eager once, then captured and replayed.

    ``__call__(input_ids [B, 1] or None, mask [B, 1] or None) -> logits [B, 1, vocab]`` (the static
    output: read or copy it before the next call), advancing the cache by one token exactly as the
    eager forward does. ``head(logits, ids)``, if given, runs inside the step after the LM head
    (e.g. choosing the next tokens and writing them into ``ids``, the next step's input buffer).
    """

    def __init__(self, model, cache: DeltaNetCache, head: Callable | None = None,
                 past_mask: torch.Tensor | None = None):
        # a weak reference: the cache holds this object, and a cycle would keep the graph's
        # memory pool alive until the garbage collector runs
        self.model, self.cache_ref, self.head = model, weakref.ref(cache), head
        cache.make_static(past_mask)
        self.device = cache.counters.next.device
        self.ids = torch.zeros(cache.batch_size(), 1, dtype=torch.long, device=self.device)
        self.mask = torch.ones_like(self.ids)
        self.mask_is_ones = True  # skip refilling it (one launch per token saved)
        # the tensors the graph reads and writes: the cache's own, from now on in place
        self.buffers = cache.tensors()
        self.recurrent = [(entry, entry.recurrent, entry.conv) for entry in cache.layers
                          if isinstance(entry, RecurrentState)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_failed = False  # the capture raised: this step runs eagerly from then on
        self.logits: torch.Tensor | None = None
        self.steps = 0
        # host seconds of the one-off parts on CUDA: "first_step_s" (the eager step, to its end on
        # the GPU) and "capture_s" (recording the step and instantiating the graph)
        self.timings: dict[str, float] = {}

    def valid_for(self, model, cache, head=None) -> bool:
        """Still the same model, head and cache tensors (nothing replaced them; the batch and device
        are the states', which ``graph_decodable`` matched with the input)."""
        tensors = cache.tensors()
        return (self.model is model and self.cache_ref() is cache and self.head is head
                and len(tensors) == len(self.buffers) and all(a is b for a, b in zip(tensors, self.buffers)))

    def _step(self) -> torch.Tensor:
        """The step function (run eagerly, or captured): embed, blocks against the static cache,
        final norm, LM head, ``head``; then the new recurrent states go into the cache's tensors
        and the device counters advance."""
        cache = self.cache_ref()
        backbone, counters = self.model.model, cache.counters
        real = self.mask[:, 0]
        # the eager forward's RoPE positions, cumsum(mask) - 1 clamped at 0, from the running count
        position_ids = (counters.real + real - 1).clamp_min(0)[:, None]
        x = backbone.embed_tokens(self.ids)
        kw = dict(mask=self.mask, full_mask=None, position_ids=position_ids, cu_seqlens=None, cache=cache)
        for block in backbone.layers:
            x = block(x, **kw)
        head = self.model.lm_head.weight
        if takes_fused_decode(self.model.config.decode_kernel, x, head):  # final norm + LM head: one GEMV kernel
            from ..ops.decode_linear import rms_norm_linear_decode

            logits = rms_norm_linear_decode(x, backbone.norm.weight, [head], backbone.norm.eps)[0]
        else:
            logits = self.model.lm_head(backbone.norm(x))
        for entry, rec, conv in self.recurrent:  # new states -> the static tensors
            if entry.recurrent is not rec:
                rec.copy_(entry.recurrent)
                entry.recurrent = rec
            if conv is not None and entry.conv is not conv:
                for b, n in zip(conv, entry.conv):
                    b.copy_(n)
                entry.conv = conv
        counters.real.add_(real)
        counters.next.add_(1)
        if self.head is not None:
            self.head(logits, self.ids)
        return logits

    def _restore(self) -> None:
        for entry, rec, conv in self.recurrent:
            entry.recurrent, entry.conv = rec, conv

    def __call__(self, input_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is not None:
            self.ids.copy_(input_ids)
        if mask is None:
            if not self.mask_is_ones:
                self.mask.fill_(1)
            self.mask_is_ones = True
        else:
            self.mask.copy_(mask)
            self.mask_is_ones = False
        self.steps += 1
        cuda = self.device.type == "cuda"
        if self.graph is None and self.steps >= 2 and cuda:
            graph = torch.cuda.CUDAGraph()
            t0 = time.perf_counter()
            try:  # capture records the step's kernels without running them: nothing advances here
                with _capture(graph, self.device):
                    self.logits = self._step()
            except Exception as e:  # an op that cannot be captured: decode eagerly from now on
                self.model.cuda_graph_decoding = False
                self.capture_failed = True
                self._restore()  # the capture's Python side pointed the entries at its own tensors
                warnings.warn(f"CUDA-graph decoding disabled for this model: capture failed ({type(e).__name__}: "
                              f"{e}); decoding eagerly", RuntimeWarning, stacklevel=3)
                return self._step()
            self.timings["capture_s"] = time.perf_counter() - t0
            self.graph = graph
        if self.graph is None:
            if self.steps == 1 and cuda:
                t0 = time.perf_counter()
                out = self._step()
                torch.cuda.synchronize(self.device)
                self.timings["first_step_s"] = time.perf_counter() - t0
                return out
            return self._step()
        self.graph.replay()
        return self.logits


def decode_step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
    """Logits of one decode step (``forward`` on the graph path, e.g. inside Hugging Face's
    ``generate``) through the cache's :class:`DecodeGraph` (built on demand)."""
    graph = getattr(cache, "_decode_graph", None)
    past_mask = attention_mask[:, :-1] if attention_mask is not None and attention_mask.shape[1] > 1 else None
    if cache.is_static and cache.ensure_capacity(cache.seen_tokens + 1):
        graph = None  # a full-attention cache grew: new tensors, new graph
    if graph is None or not graph.valid_for(model, cache):
        graph = cache._decode_graph = DecodeGraph(model, cache, past_mask=past_mask)
    logits = graph(input_ids, attention_mask[:, -1:] if attention_mask is not None else None)
    cache.seen_tokens += 1
    return logits.clone()  # the static output is overwritten by the next replay
