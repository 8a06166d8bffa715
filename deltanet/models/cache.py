"""The generation cache: one typed entry per layer, and the static form that decode graphs use.

Per layer, ``cache.layers[i]`` is one of:

- :class:`RecurrentState` (``delta_net``, ``gated_delta_net``, ``gated_delta_product``,
  ``delta_product``, ``linear_attention``): the recurrent state ``[B, H, K, V]`` float32 and the
  short-conv inputs of the last ``conv_size - 1`` tokens (q, k, v), ``[B, W-1, C]`` each;
- :class:`KVCache` (attention layers, eager decoding): keys and values ``[B, S, Hkv, D]`` of every
  position so far (``full_attention``) or of the last ``sliding_window`` positions
  (``sliding_attention``), growing along ``S``;
- :class:`StaticKVCache` (attention layers under a decode graph): preallocated keys and values
  ``[B, Hkv, L, D]`` with a per-slot validity mask, written in place at a device-side position.
  ``full_attention``: ``L`` = prompt + tokens still to come (grown by doubling when full), slot =
  position; ``sliding_attention``: a ring of ``L = sliding_window`` slots, slot = position mod
  ``L``. Every decode step has the same shapes, which is what a CUDA graph needs.

:meth:`DeltaNetCache.make_static` turns the eager entries into the static ones (once, before the
first captured step), :meth:`DeltaNetCache.make_dynamic` back (for a multi-token forward after
graph decoding). Layers read and write only these fields.

The cache implements what Hugging Face's ``GenerationMixin`` reads from a cache
(``get_seq_length``, ``reorder_cache`` for beam search ...) without subclassing
``transformers.Cache``, whose internals change between releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..layers.delta_net import DELTA_TYPES

__all__ = ["DecodeCounters", "DeltaNetCache", "KVCache", "RecurrentState", "StaticKVCache", "RECURRENT_TYPES"]

RECURRENT_TYPES = (*DELTA_TYPES, "linear_attention")  # layers that keep a fixed-size state

# Full-attention slots added beyond the current length when a static cache is made or grows and
# nobody said how many tokens are coming (``generate`` of Hugging Face does not tell the model).
DEFAULT_RESERVE = 256


def _rows(x: torch.Tensor | tuple | None, fn: Callable) -> torch.Tensor | tuple | None:
    if x is None:
        return None
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def _flat(*xs) -> list[torch.Tensor]:
    out = []
    for x in xs:
        if isinstance(x, tuple):
            out.extend(x)
        elif x is not None:
            out.append(x)
    return out


@dataclass
class RecurrentState:
    """Fixed-size state of a delta-family or linear-attention layer (None before the first forward)."""

    recurrent: torch.Tensor | None = None  # [B, H, K, V] float32
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # q, k, v inputs: [B, W-1, C]

    @property
    def ready(self) -> bool:
        return self.recurrent is not None

    def tensors(self) -> list[torch.Tensor]:
        return _flat(self.recurrent, self.conv)

    def map_rows(self, fn: Callable) -> None:
        self.recurrent, self.conv = _rows(self.recurrent, fn), _rows(self.conv, fn)


@dataclass
class KVCache:
    """Keys and values of an attention layer, ``[B, S, Hkv, D]``, growing along ``S`` (eager decoding)."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        return self.k is not None

    def tensors(self) -> list[torch.Tensor]:
        return _flat(self.k, self.v)

    def map_rows(self, fn: Callable) -> None:
        self.k, self.v = _rows(self.k, fn), _rows(self.v, fn)


@dataclass
class StaticKVCache:
    """Preallocated keys and values ``[B, Hkv, L, D]`` and ``valid [B, L]`` (True: a real token's
    key is in the slot). ``ring``: sliding window, slot = position mod L; else slot = position.

    The head-major layout (unlike the model's ``[B, T, H, D]``) keeps each head's keys contiguous,
    so a decode step reads the cache as ``Hkv`` dense ``[L, D]`` matrices."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    ring: bool

    ready = True

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.valid]

    def map_rows(self, fn: Callable) -> None:
        self.k, self.v, self.valid = fn(self.k), fn(self.v), fn(self.valid)


@dataclass
class DecodeCounters:
    """Device-side positions of static decoding (a captured step cannot read host integers):
    ``real [B]`` real (unpadded) tokens so far per row, the next RoPE position being ``real`` (or
    ``real - 1`` for a padded token, as the eager forward's ``cumsum(mask) - 1``); ``next []`` the
    position (padding included) the next token takes, i.e. ``seen_tokens`` on the device."""

    real: torch.Tensor
    next: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.real, self.next]


def _fill_static(static: StaticKVCache, entry: KVCache, past_mask: torch.Tensor, S: int) -> None:
    """Write an eager cache's keys and values (positions ``S - n .. S - 1``) into the slots of a
    zeroed static one: position mod L in a ring (sliding window), else the position itself."""
    n = entry.k.shape[1]
    slots = torch.arange(S - n, S, device=static.k.device)
    if static.ring:
        slots = slots % static.capacity
    static.k[:, :, slots] = entry.k.transpose(1, 2)
    static.v[:, :, slots] = entry.v.transpose(1, 2)
    static.valid[:, slots] = past_mask[:, S - n:]


def _entry(kind: str):
    return RecurrentState() if kind in RECURRENT_TYPES else KVCache()


class DeltaNetCache:
    """Cache of a :class:`~deltanet.models.DeltaNetForCausalLM` forward with ``use_cache=True``.

    Example::

        >>> from deltanet.models.presets import get_config
        >>> cache = DeltaNetCache(get_config("tiny"))
        >>> cache.get_seq_length(), len(cache), type(cache.layers[0]).__name__
        (0, 4, 'RecurrentState')
    """

    is_compileable = False  # eager entries change shape every step: no static-cache compilation
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier position

    def __init__(self, config):
        self.layer_types = list(config.layer_types)
        self.sliding_window = getattr(config, "sliding_window", None)
        self.layers: list[RecurrentState | KVCache | StaticKVCache] = [_entry(t) for t in self.layer_types]
        self.seen_tokens = 0
        self.counters: DecodeCounters | None = None  # set by make_static
        self.reserve: int | None = None  # full-attention slots to preallocate beyond the prompt

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: True where the state does not grow with the sequence."""
        return [t in RECURRENT_TYPES or t == "sliding_attention" for t in self.layer_types]

    @property
    def is_static(self) -> bool:
        return self.counters is not None

    @property
    def ready(self) -> bool:
        """Every layer holds its state (a prefill has run)."""
        return all(entry.ready for entry in self.layers)

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Number of positions (padding included) processed so far."""
        return self.seen_tokens

    def batch_size(self) -> int | None:
        """Rows of the cached states (None before the first forward)."""
        for entry in self.layers:
            tensors = entry.tensors()
            if tensors:
                return tensors[0].shape[0]
        return None

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # unbounded (a static full-attention cache grows when full)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache holds (the static decode step's buffers are these, by identity)."""
        out = [t for entry in self.layers for t in entry.tensors()]
        return out + (self.counters.tensors() if self.counters is not None else [])

    # -- batch rows (beam search, num_return_sequences) ------------------------------------------------
    def _map_rows(self, fn: Callable) -> None:
        for entry in self.layers:
            entry.map_rows(fn)
        if self.counters is not None:
            self.counters.real = fn(self.counters.real)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search), in place: the tensors keep their identity, so a
        captured decode step stays valid across beam reorders."""
        def select(x):
            return x.copy_(x.index_select(0, beam_idx.to(x.device)))
        self._map_rows(select)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(lambda x: x[indices])

    # -- static form ----------------------------------------------------------------------------------
    def make_static(self, past_mask: torch.Tensor | None = None, reserve: int | None = None) -> None:
        """Turn the attention layers' growing K/V into preallocated / ring buffers and set up the
        device counters (idempotent). ``past_mask [B, seen_tokens]``: the padding mask of every
        position so far (None: all real). ``reserve``: full-attention slots beyond the current
        length (default ``self.reserve`` or 256; the cache grows by doubling when full)."""
        if self.is_static:
            return
        if not self.ready:
            raise ValueError("make_static needs a cache filled by a prefill (every layer's state set)")
        S, B = self.seen_tokens, self.batch_size()
        any_tensor = self.tensors()[0]
        device = any_tensor.device
        if past_mask is None:
            past_mask = torch.ones(B, S, dtype=torch.bool, device=device)
        past_mask = past_mask.to(device=device, dtype=torch.bool)
        if tuple(past_mask.shape) != (B, S):
            raise ValueError(f"past_mask must have shape [B, seen_tokens] = {(B, S)}, got {tuple(past_mask.shape)}")
        reserve = reserve if reserve is not None else (self.reserve or DEFAULT_RESERVE)
        for i, (kind, entry) in enumerate(zip(self.layer_types, self.layers)):
            if not isinstance(entry, KVCache):
                continue
            ring = kind == "sliding_attention"
            L = self.sliding_window if ring else S + max(1, reserve)
            static = StaticKVCache(entry.k.new_zeros(B, entry.k.shape[2], L, entry.k.shape[3]),
                                   entry.v.new_zeros(B, entry.v.shape[2], L, entry.v.shape[3]),
                                   torch.zeros(B, L, dtype=torch.bool, device=device), ring=ring)
            _fill_static(static, entry, past_mask, S)
            self.layers[i] = static
        self.counters = DecodeCounters(real=past_mask.sum(1), next=torch.tensor(S, device=device))

    def refill(self, prefill: "DeltaNetCache", past_mask: torch.Tensor | None = None) -> bool:
        """Load a prefill's cache into this static one, in place (every tensor keeps its identity,
        so a decode step captured on this cache replays on the new contents). ``prefill``: an
        eager cache of the same model and batch size just filled by a forward; ``past_mask
        [B, seen_tokens]`` as in :meth:`make_static`. Returns False (and changes nothing) when the
        shapes do not fit: another batch size, or a full-attention cache too short for the prompt
        plus ``self.reserve`` more tokens."""
        if not self.is_static or prefill.is_static or not prefill.ready or len(prefill) != len(self):
            return False
        S, B = prefill.seen_tokens, prefill.batch_size()
        if B != self.batch_size():
            return False
        device = self.counters.next.device
        mask = (torch.ones(B, S, dtype=torch.bool, device=device) if past_mask is None
                else past_mask.to(device=device, dtype=torch.bool))
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"past_mask must have shape [B, seen_tokens] = {(B, S)}, got {tuple(mask.shape)}")
        pairs = list(zip(self.layers, prefill.layers))
        for dst, src in pairs:  # check every layer before writing any
            if isinstance(dst, RecurrentState):
                if not isinstance(src, RecurrentState) or [t.shape for t in dst.tensors()] != [
                        t.shape for t in src.tensors()]:
                    return False
            elif not isinstance(src, KVCache) or src.k.shape[0] != B or (
                    not dst.ring and dst.capacity < S + max(1, self.reserve or 1)):
                return False
        for dst, src in pairs:
            if isinstance(dst, RecurrentState):
                for a, b in zip(dst.tensors(), src.tensors()):
                    a.copy_(b)
            else:
                for t in dst.tensors():
                    t.zero_()
                _fill_static(dst, src, mask, S)
        self.counters.real.copy_(mask.sum(1))
        self.counters.next.fill_(S)
        self.seen_tokens = S
        return True

    def ensure_capacity(self, positions: int) -> bool:
        """Grow every static full-attention cache to hold ``positions`` positions (doubling the
        reserve). Returns True if any tensor was replaced (a captured step must be rebuilt)."""
        grown = False
        for entry in self.layers:
            if isinstance(entry, StaticKVCache) and not entry.ring and entry.capacity < positions:
                L = max(positions, 2 * entry.capacity)
                pad = L - entry.capacity
                entry.k = torch.cat([entry.k, entry.k.new_zeros(*entry.k.shape[:2], pad, entry.k.shape[3])], 2)
                entry.v = torch.cat([entry.v, entry.v.new_zeros(*entry.v.shape[:2], pad, entry.v.shape[3])], 2)
                entry.valid = torch.cat([entry.valid, entry.valid.new_zeros(entry.valid.shape[0], pad)], 1)
                grown = True
        return grown

    def make_dynamic(self) -> None:
        """The inverse of :meth:`make_static`: attention layers get growing K/V again, in
        position order (sliding layers: the last ``sliding_window`` positions)."""
        if not self.is_static:
            return
        S = self.seen_tokens
        for i, entry in enumerate(self.layers):
            if not isinstance(entry, StaticKVCache):
                continue
            if entry.ring:
                n = min(S, entry.capacity)
                slots = torch.arange(S - n, S, device=entry.k.device) % entry.capacity
            else:
                slots = torch.arange(S, device=entry.k.device)
            self.layers[i] = KVCache(entry.k[:, :, slots].transpose(1, 2).contiguous(),
                                     entry.v[:, :, slots].transpose(1, 2).contiguous())
        self.counters = None
        self.__dict__.pop("_decode_graph", None)  # its buffers are gone

    def __repr__(self) -> str:
        return f"DeltaNetCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens}, static={self.is_static})"

