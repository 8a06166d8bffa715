"""The decode loop: prefill, then one captured step per token with the token choice inside.

:func:`decode` is the fast path behind ``deltanet generate`` and ``deltanet bench decode``. After
the prefill (an ordinary forward), each token is one replay of a :class:`DecodeGraph` whose step
runs the model on the previous token, the LM head, and :class:`TokenChooser` (greedy / sampled
choice, EOS bookkeeping, the output buffer, the next input), all on the device: no host sync per
token unless the caller streams tokens (then the host reads each token one step behind the GPU).
Full-attention caches are preallocated for exactly prompt + ``max_new_tokens`` positions.

The captured step outlives its generation: :func:`decode` keeps it on the model (a few per model,
the least recently used dropped) with its static cache and token chooser, keyed by everything the
graph fixes (batch, full-attention capacity, token choice, EOS / padding ids, the model's weights
and decode switches). A later generation of the same key loads its prefill into that cache in place
(:meth:`~deltanet.models.cache.DeltaNetCache.refill`) and replays at once: no eager first step, no
capture. ``reuse_graph=False`` or :func:`clear_decode_graphs` opt out / free the memory.

``cuda_graph=False`` (and the CPU) run the plain eager forward with growing K/V and the same token
choice: the reference the captured loop is tested against. Greedy output equals Hugging Face's
``generate(do_sample=False)``; sampled output follows the same distribution as its sampling, but
not the same draws (see :mod:`deltanet.models.sampling`). Beam search and the rest of
``generate``'s options stay on Hugging Face's ``generate``.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import cuda_graph as _cg
from .sampling import SamplingConfig, choose_tokens

__all__ = ["DecodeResult", "TokenChooser", "clear_decode_graphs", "decode"]

# Decode graphs kept per model for reuse (each holds its cache, its graph's memory pool and its
# token chooser): the most recently used ones.
KEPT_GRAPHS = 4


@dataclass
class DecodeResult:
    """``tokens [B, n]``: the new tokens (``pad_token_id`` after a row's EOS; ``n <= max_new_tokens``,
    fewer when every row finished); timings in seconds (CUDA-synchronised); ``graph``: whether the
    captured step was used; ``cache``: the cache after the last step. ``stats["setup_s"]`` (captured
    loop of 3+ tokens): of ``decode_s``, the time to the end of the first replay -- the eager first
    step, the capture and one replay, once per generation -- so that ``steady_tokens_per_s`` is the
    rate of the replays alone; of it, ``stats["first_step_s"]`` (the eager step, to its end on the
    GPU) and ``stats["capture_s"]`` (recording the step and instantiating the graph); with a kept
    step reused (``stats["graph_reused"]``) the setup is the first replay alone. With graphs kept
    for reuse, ``cache`` is the kept static cache: the next :func:`decode` of the same shapes
    overwrites it in place."""

    tokens: torch.Tensor
    prefill_s: float
    decode_s: float
    graph: bool
    stats: dict = field(default_factory=dict)
    cache: object = None  # the DeltaNetCache after the last step (sizes, benchmarks)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all rows, EOS padding included) per second of prefill + decode."""
        total = self.prefill_s + self.decode_s
        return self.tokens.numel() / total if total > 0 else float("inf")

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Tokens (all rows) per second of the replayed steps after the first replay (the captured
        loop's steady rate); None without a graph or with fewer than 4 new tokens."""
        setup, steps = self.stats.get("setup_s"), self.tokens.shape[1]
        if setup is None or steps < 4 or self.decode_s <= setup:
            return None
        return self.tokens.shape[0] * (steps - 3) / (self.decode_s - setup)


class TokenChooser:
    """The head of the decode step: choose the next tokens from the last logits, mask finished
    rows with ``pad``, record them in ``out [B, max_new_tokens]`` at the device counter ``n``, and
    write them into the step's input buffer. Every operation is in place on fixed tensors."""

    def __init__(self, cfg: SamplingConfig, batch: int, max_new_tokens: int, device, *, eos: int | None,
                 pad: int):
        self.cfg, self.eos, self.pad = cfg, eos, pad
        # inside a captured step: the position the chosen tokens take (a device counter)
        self.position: Callable[[], torch.Tensor] | None = None
        self.out = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.n = torch.zeros((), dtype=torch.long, device=device)

    def reset(self) -> None:
        """Back to no tokens chosen, in place (a kept decode graph reads these tensors)."""
        self.out.fill_(self.pad)
        self.finished.zero_()
        self.n.zero_()

    def choose(self, logits: torch.Tensor, position) -> torch.Tensor:
        """``logits [B, 1 or T, V]`` -> the recorded tokens ``[B]``."""
        tok = choose_tokens(logits[:, -1], self.cfg, position)
        tok = torch.where(self.finished, torch.full_like(tok, self.pad), tok)
        self.out.index_copy_(1, self.n.reshape(1), tok[:, None])
        if self.eos is not None:
            self.finished |= tok == self.eos
        self.n.add_(1)
        return tok

    def __call__(self, logits: torch.Tensor, ids: torch.Tensor) -> None:  # inside the captured step
        ids.copy_(self.choose(logits, self.position())[:, None])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
           sampling: SamplingConfig | None = None, eos_token_id: int | None = None, pad_token_id: int = 0,
           on_tokens: Callable[[torch.Tensor], None] | None = None, cuda_graph: bool | None = None,
           check_every: int = 16, reuse_graph: bool | None = None) -> DecodeResult:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids [B, S]`` (left padding marked by
    ``attention_mask``, 1 = token).

    ``on_tokens(ids)``: called with each step's tokens ``[B]`` on the CPU as they are made
    (streaming). ``cuda_graph``: use the captured step (default: ``model.cuda_graph_decoding`` on
    a device that captures); False: the eager reference loop. Generation stops early once every
    row has produced ``eos_token_id`` (checked every ``check_every`` steps without streaming).
    ``reuse_graph``: keep the captured step for the next generation of the same key and replay a
    kept one (default: ``model.reuse_decode_graphs``; see the module docstring).

    Example::

        >>> from deltanet.models import DeltaNetForCausalLM, get_config
        >>> model = DeltaNetForCausalLM(get_config("tiny", vocab_size=64)).eval()
        >>> decode(model, torch.randint(0, 64, (2, 5)), max_new_tokens=3).tokens.shape
        torch.Size([2, 3])
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, S], got {getattr(input_ids, 'shape', input_ids)!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    sampling = sampling or SamplingConfig()
    device = input_ids.device
    B, S = input_ids.shape
    if cuda_graph is None:
        cuda_graph = bool(getattr(model, "cuda_graph_decoding", False))
    cuda_graph = cuda_graph and device.type in _cg.GRAPH_DEVICES
    mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(input_ids)

    if reuse_graph is None:
        reuse_graph = bool(getattr(model, "reuse_decode_graphs", True))
    key = (_graph_key(model, B, S, max_new_tokens, sampling, eos_token_id, pad_token_id, device)
           if cuda_graph and reuse_graph else None)

    was_training, graph_flag = model.training, model.cuda_graph_decoding
    model.eval()
    model.cuda_graph_decoding = False  # the eager forwards below never take the graph path themselves
    try:
        kept = _kept(model).get(key) if key is not None else None
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        cache = out.cache  # (transformers >= 5.2x warns on .past_key_values)
        graph = None
        if kept is not None:  # the kept step's cache takes this prefill's states, in place
            kept.cache.reserve = max_new_tokens
            if kept.graph.valid_for(model, kept.cache, kept.chooser) and kept.cache.refill(cache, mask):
                cache, chooser, graph = kept.cache, kept.chooser, kept.graph
                chooser.reset()
                _kept(model).move_to_end(key)
            else:
                _kept(model).pop(key)
                kept = None
        if kept is None:
            cache.reserve = max_new_tokens  # full-attention slots beyond the prompt: exactly what is coming
            # a kept chooser's output buffer fits any generation of its key (capacity bucket)
            chooser = TokenChooser(sampling, B, _out_capacity(max_new_tokens) if key is not None else max_new_tokens,
                                   device, eos=eos_token_id, pad=pad_token_id)
        tok = chooser.choose(out.logits, S)
        _sync(device)
        prefill_s = time.perf_counter() - t0

        if cuda_graph:
            if graph is None:
                graph = _cg.DecodeGraph(model, cache, head=chooser, past_mask=mask)
                # the head runs after the step advanced the counter: the position of the token being chosen
                chooser.position = lambda c=cache: c.counters.next
            graph.ids.copy_(tok[:, None])
        else:
            full_mask = mask
        stream = _Streamer(on_tokens, device, eos_token_id)
        stream.push(tok)
        t0 = time.perf_counter()
        steps = 1
        setup_s = None
        while steps < max_new_tokens:
            if graph is not None:
                graph()
                cache.seen_tokens += 1
                tok = graph.ids[:, 0]
                if setup_s is None and graph.graph is not None:
                    # to the end of this generation's first replay: eager step + capture + replay
                    # for a new step, the replay alone for a kept one
                    _sync(device)
                    setup_s = time.perf_counter() - t0
            else:
                full_mask = torch.cat([full_mask, full_mask.new_ones(B, 1)], 1)
                logits = model(tok[:, None], attention_mask=full_mask, past_key_values=cache).logits
                tok = chooser.choose(logits, cache.seen_tokens)
            steps += 1
            stream.push(tok)
            if eos_token_id is not None and (bool(stream.finished.all()) if on_tokens is not None
                                             else steps % check_every == 0 and bool(chooser.finished.all())):
                break
        stream.flush()
        _sync(device)
        decode_s = time.perf_counter() - t0
        if key is not None and kept is None and graph is not None and not graph.capture_failed:
            pool = _kept(model)
            pool[key] = _Kept(graph, cache, chooser)
            while len(pool) > KEPT_GRAPHS:
                pool.popitem(last=False)
    finally:
        model.cuda_graph_decoding = graph_flag
        model.train(was_training)
    tokens = chooser.out[:, :steps].clone() if key is not None else chooser.out[:, :steps]
    stats = dict(batch=B, prompt=S, steps=steps)
    if graph is not None:
        stats["graph_reused"] = kept is not None
    if setup_s is not None and graph is not None and graph.graph is not None:
        stats["setup_s"] = setup_s
        if kept is None:
            stats.update(graph.timings)
    return DecodeResult(tokens=tokens, prefill_s=prefill_s, decode_s=decode_s, graph=graph is not None,
                        stats=stats, cache=cache)


@dataclass
class _Kept:
    graph: "_cg.DecodeGraph"
    cache: object
    chooser: TokenChooser


class _KeptGraphs(collections.OrderedDict):
    """A model's kept decode graphs, least recently used first. Not copied with the model
    (``copy.deepcopy``, pickling): a copy has other weights and captures its own."""

    def __deepcopy__(self, memo):
        return _KeptGraphs()

    def __reduce__(self):
        return (_KeptGraphs, ())


def _kept(model) -> _KeptGraphs:
    pool = model.__dict__.get("_kept_decode_graphs")
    if pool is None:
        pool = model.__dict__["_kept_decode_graphs"] = _KeptGraphs()
    return pool


def clear_decode_graphs(model) -> int:
    """Drop the decode graphs :func:`decode` kept on ``model`` (their caches and graph memory are
    freed once nothing else holds them). Returns how many there were."""
    pool = model.__dict__.pop("_kept_decode_graphs", None)
    return len(pool) if pool is not None else 0


def _out_capacity(max_new_tokens: int) -> int:
    """Columns of a kept chooser's output buffer: a power of two >= max_new_tokens, at least 64
    (a short warm-up generation and a long one share the step)."""
    return max(64, 1 << (max_new_tokens - 1).bit_length())


def _graph_key(model, B: int, S: int, max_new_tokens: int, sampling: SamplingConfig, eos, pad: int,
               device: torch.device) -> tuple:
    """Everything a kept decode step fixes: batch, device, the full-attention capacity (prompt +
    new tokens; recurrent states and sliding-window rings do not depend on either), the output
    buffer's capacity, the token choice (greedy ignores seed, top-k and top-p), EOS / padding ids,
    and :func:`~deltanet.models.cuda_graph.step_settings`."""
    full = "full_attention" in model.config.layer_types
    if sampling.greedy:
        sampling = SamplingConfig(vocab_limit=sampling.vocab_limit)
    return (B, str(device), S + max_new_tokens if full else None, _out_capacity(max_new_tokens), sampling, eos,
            pad, _cg.step_settings(model))


class _Streamer:
    """Hands each step's tokens to the host callback one step late on CUDA (the copy is queued
    behind the step; the host waits for step t only after step t + 1 is launched), so streaming
    costs no GPU idle time. ``finished``: the rows whose EOS the host has seen."""

    def __init__(self, fn, device: torch.device, eos: int | None):
        self.fn, self.device, self.eos, self.pending = fn, device, eos, None
        self.finished = torch.zeros(1, dtype=torch.bool)

    def push(self, tok: torch.Tensor) -> None:
        if self.fn is None:
            return
        if self.device.type != "cuda":
            self._emit(tok.to("cpu", copy=True))  # a copy: the step overwrites its ids buffer
            return
        host = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
        host.copy_(tok, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        previous, self.pending = self.pending, (host, event)
        if previous is not None:
            previous[1].synchronize()
            self._emit(previous[0])

    def _emit(self, host: torch.Tensor) -> None:
        if self.eos is not None:
            self.finished = self.finished | (host == self.eos)
        self.fn(host)

    def flush(self) -> None:
        if self.pending is not None:
            self.pending[1].synchronize()
            self._emit(self.pending[0])
            self.pending = None


# Hugging Face ``generate`` arguments the captured loop covers for greedy search, and the fields of
# a model's generation config that may differ from transformers' defaults (the rest, e.g. a
# repetition penalty, change greedy search: Hugging Face's loop runs them).
_FAST_KWARGS = {"input_ids", "attention_mask", "max_new_tokens", "min_new_tokens", "max_length", "do_sample",
                "num_beams", "pad_token_id", "eos_token_id", "bos_token_id", "return_dict_in_generate", "use_cache"}
_FAST_CONFIG = {"use_cache", "output_attentions", "output_hidden_states", "pad_token_id", "bos_token_id",
                "eos_token_id", "decoder_start_token_id", "_from_model_config", "transformers_version",
                "max_length", "max_new_tokens", "min_new_tokens", "do_sample", "num_beams",
                "temperature", "top_k", "top_p"}  # the last three: unused by greedy search


def generate_fast(model, inputs, generation_config, kwargs: dict):
    """``model.generate(inputs, generation_config, **kwargs)`` as the captured loop (:func:`decode`),
    or None where it does not apply: the loop covers greedy search (``do_sample=False``, one beam)
    with ``max_new_tokens`` / ``max_length``, ``attention_mask`` (left padding), one EOS id,
    ``pad_token_id`` and ``return_dict_in_generate`` (sequences and the cache), on a device whose
    decode steps are captured (``model.cuda_graph_decoding``). Anything else — sampling (Hugging
    Face draws from torch's generator, the loop from its own seeded noise), beams, logits
    processors, stopping criteria, streamers, scores, ``min_new_tokens`` with an EOS, a generation
    config with other settings — returns None, and Hugging Face's loop runs it. The tokens are
    those of Hugging Face's greedy search (tested), and the output stops where it would: after the
    step in which the last row produced its EOS, finished rows padded with ``pad_token_id``."""
    if not (getattr(model, "fast_generate", False) and getattr(model, "cuda_graph_decoding", False)):
        return None
    if generation_config is not None or not set(kwargs) <= _FAST_KWARGS:
        return None
    ids = kwargs.get("input_ids") if inputs is None else inputs
    if inputs is not None and "input_ids" in kwargs:
        return None
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.shape[1] == 0:
        return None
    if ids.device.type not in _cg.GRAPH_DEVICES:
        return None
    gc = model.generation_config
    if not set(gc.to_diff_dict()) <= _FAST_CONFIG:
        return None
    get = lambda name: kwargs[name] if name in kwargs else getattr(gc, name, None)  # noqa: E731
    # (transformers 5 leaves unset config fields None: greedy, one beam)
    if get("do_sample") or (get("num_beams") or 1) != 1 or kwargs.get("use_cache", True) is False:
        return None
    if gc.output_attentions or gc.output_hidden_states:
        return None
    eos = get("eos_token_id")
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            return None
        eos = eos[0]
    eos = int(eos) if eos is not None else None
    pad = get("pad_token_id")
    pad = int(pad) if pad is not None else (eos if eos is not None else 0)  # Hugging Face pads with the EOS
    if eos is not None and (get("min_new_tokens") or getattr(gc, "min_length", None)):
        return None
    S = ids.shape[1]
    n = get("max_new_tokens")
    if n is None and get("max_length") is not None:
        n = get("max_length") - S
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None  # no length given (transformers' default differs between versions), or none left
    mask = kwargs.get("attention_mask")
    if mask is None and get("pad_token_id") is not None and bool((ids == get("pad_token_id")).any()):
        return None  # Hugging Face would infer a padding mask from the pad tokens: leave it to it
    res = decode(model, ids, mask, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, cuda_graph=True)
    tokens = res.tokens
    if eos is not None and tokens.shape[1]:
        hit = tokens == eos  # each row's length: to its first EOS, else all of it
        lengths = torch.where(hit.any(1), hit.int().argmax(1) + 1, tokens.shape[1])
        tokens = tokens[:, :int(lengths.max())]
    sequences = torch.cat([ids, tokens], 1)
    if not get("return_dict_in_generate"):
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(sequences=sequences, past_key_values=res.cache)
