"""One-token decode steps replayed as a CUDA graph.

A decode step of the 340M model is ~600 small kernels (24 layers of projections, convs, norms
and the recurrent update on a batch of one token) whose launch cost, not their work, sets the
speed: eager decoding ran at 19–26 tokens/s at batch 1 on an H200 (2026-11-30; benchmarks/results/
2026-11-30-h200-model-profile-compiled-conv.md and ...-model-triton-conv-cuda-graph.md). A model
whose layers all keep a fixed-size state (``delta_net``, ``linear_attention``) has the same
shapes and the same state tensors at every step, so one captured graph per generation replays
the whole step with a single launch.

How: the cache's state tensors become the graph's static inputs. The first decode step of a
cache runs eagerly through :meth:`DecodeGraph._step`, which computes the step from the state
tensors, then copies the new states back into them (in place) and keeps them in the cache. That
step compiles/warms every kernel; the second step captures the same function and replays it,
later steps only replay. Each replay reads the token ids and the new token's padding mask from
two static buffers and updates the cache in place. Anything that swaps a state tensor
(``reorder_cache`` in beam search, a user assigning a state) is noticed by identity and rebuilds
the graph.

Models with attention layers (K/V growing by one position per step) decode eagerly.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .cache import _RECURRENT, DeltaNetCache

__all__ = ["DecodeGraph", "graph_decodable", "recurrent_only"]

# Devices on which the graph path is taken. Only CUDA captures; the tests add "cpu" to run the
# same static-buffer step eagerly (the bookkeeping is device independent).
GRAPH_DEVICES = ("cuda",)


def recurrent_only(layer_types) -> bool:
    """Whether every layer keeps a fixed-size state: the models whose decode steps are graphed."""
    return all(t in _RECURRENT for t in layer_types)


def graph_decodable(model, input_ids, cache, *, attention_mask, inputs_embeds, labels, position_ids, cu_seqlens,
                    output_hidden_states) -> bool:
    """Whether this ``forward`` is a one-token decode step the graph path can take (no host sync).
    Anything else, malformed input included, goes the eager way (which validates it)."""
    if not (model.cuda_graph_decoding and isinstance(cache, DeltaNetCache) and cache.seen_tokens > 0
            and isinstance(input_ids, torch.Tensor) and input_ids.ndim == 2 and input_ids.shape[1] == 1
            and recurrent_only(cache.layer_types) and all("recurrent" in s for s in cache.layers)):
        return False
    B, state = input_ids.shape[0], cache.layers[0]["recurrent"]
    return (state.shape[0] == B and state.device == input_ids.device and input_ids.device.type in GRAPH_DEVICES
            and inputs_embeds is None and not input_ids.is_floating_point()
            and (attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2
                                            and attention_mask.shape[0] == B
                                            and attention_mask.shape[1] in (1, cache.seen_tokens + 1)))
            and labels is None and position_ids is None
            and cu_seqlens is None and not output_hidden_states and not model.training
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


class DecodeGraph:
    """The decode step of one model on one cache: eager once, then captured and replayed.

    ``__call__(cache, input_ids [B, 1], attention_mask [B, S] or None) -> logits [B, 1, vocab]`` (a
    fresh tensor), advancing the cache by one token exactly as the eager forward does.
    """

    def __init__(self, model, cache):
        # a weak reference: the cache holds this object, and a cycle would keep the graph's
        # memory pool alive until the garbage collector runs
        self.model, self.cache_ref = model, weakref.ref(cache)
        self.device = cache.layers[0]["recurrent"].device
        self.ids = torch.zeros(cache.batch_size(), 1, dtype=torch.long, device=self.device)
        self.mask = torch.ones_like(self.ids)
        # the state tensors the graph reads and writes: the cache's own, from now on in place
        self.buffers = [dict(state) for state in cache.layers]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0

    def valid_for(self, model, cache) -> bool:
        """Still the same model and state tensors (nothing replaced them; the batch and device
        are the states', which ``graph_decodable`` matched with the input)."""
        return (self.model is model and self.cache_ref() is cache
                and all(state.get(key) is buf for state, bufs in zip(cache.layers, self.buffers)
                        for key, buf in bufs.items()))

    def _step(self, cache) -> torch.Tensor:
        backbone = self.model.model
        x = backbone.embed_tokens(self.ids)
        kw = dict(mask=self.mask, full_mask=None, position_ids=None, cu_seqlens=None, cache=cache)
        for block in backbone.layers:
            x = block(x, **kw)
        logits = self.model.lm_head(backbone.norm(x))
        for state, bufs in zip(cache.layers, self.buffers):  # new states -> the static tensors
            for key, buf in bufs.items():
                new = state[key]
                for b, n in zip(buf, new) if isinstance(buf, tuple) else ((buf, new),):
                    b.copy_(n)
                state[key] = buf
        return logits

    def __call__(self, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        self.ids.copy_(input_ids)
        if attention_mask is None:
            self.mask.fill_(1)
        else:
            self.mask.copy_(attention_mask[:, -1:])
        self.steps += 1
        if self.graph is None and self.steps >= 2 and self.device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.logits = self._step(cache)
            except Exception as e:  # an op that cannot be captured: decode eagerly from now on
                self.model.cuda_graph_decoding = False
                for state, bufs in zip(cache.layers, self.buffers):
                    state.update(bufs)
                warnings.warn(f"CUDA-graph decoding disabled for this model: capture failed ({type(e).__name__}: "
                              f"{e}); decoding eagerly", RuntimeWarning, stacklevel=3)
                return self._step(cache)
            self.graph = graph
        if self.graph is None:
            return self._step(cache)
        self.graph.replay()
        return self.logits.clone()  # the static output is overwritten by the next replay


def decode_step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
    """Logits of one decode step through the cache's :class:`DecodeGraph` (built on demand)."""
    graph = getattr(cache, "_decode_graph", None)
    if graph is None or not graph.valid_for(model, cache):
        graph = cache._decode_graph = DecodeGraph(model, cache)
    logits = graph(cache, input_ids, attention_mask)
    cache.seen_tokens += 1
    return logits
