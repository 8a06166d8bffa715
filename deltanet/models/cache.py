"""The generation cache: per-layer recurrent / conv states and attention keys and values.

Per layer (``cache.layers[i]``, a dict the layer updates in place):

- ``"delta_net"`` / ``"gated_delta_net"`` / ``"gated_delta_product"`` / ``"delta_product"`` /
  ``"linear_attention"``: ``"recurrent"`` ``[B, H, K, V]`` float32 and
  ``"conv"`` = (q, k, v) conv inputs of the last ``conv_size - 1`` tokens, ``[B, W-1, C]``;
- ``"full_attention"``: ``"k"``, ``"v"`` ``[B, S, Hkv, D]`` for every position so far;
- ``"sliding_attention"``: the same, but only the last ``sliding_window`` positions.

It implements what Hugging Face's ``GenerationMixin`` reads from a cache (``get_seq_length``,
``is_compileable``, ``reorder_cache`` for beam search ...) without subclassing
``transformers.Cache``, whose internals change between releases.
"""

from __future__ import annotations

import torch

from ..layers.delta_net import DELTA_TYPES

__all__ = ["DeltaNetCache"]

_RECURRENT = (*DELTA_TYPES, "linear_attention")  # layers that keep a fixed-size state


class DeltaNetCache:
    """Cache of a :class:`~deltanet.models.DeltaNetForCausalLM` forward with ``use_cache=True``.

    Example::

        >>> from deltanet.models.presets import get_config
        >>> cache = DeltaNetCache(get_config("tiny"))
        >>> cache.get_seq_length(), len(cache)
        (0, 4)
    """

    is_compileable = False  # shapes change every step: no static-cache compilation
    is_croppable = False  # a recurrent state cannot be rolled back to an earlier position

    def __init__(self, config):
        self.layer_types = list(config.layer_types)
        self.layers: list[dict] = [{} for _ in self.layer_types]
        self.seen_tokens = 0

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def is_linear(self) -> list[bool]:
        """Per layer: True where the state does not grow with the sequence."""
        return [t in _RECURRENT or t == "sliding_attention" for t in self.layer_types]

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Number of positions (padding included) processed so far."""
        return self.seen_tokens

    def batch_size(self) -> int | None:
        """Rows of the cached states (None before the first forward)."""
        for state in self.layers:
            for value in state.values():
                return (value[0] if isinstance(value, tuple) else value).shape[0]
        return None

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # unbounded

    def _map(self, fn) -> None:
        for state in self.layers:
            for key, value in state.items():
                state[key] = tuple(fn(x) for x in value) if isinstance(value, tuple) else fn(value)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search)."""
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def __repr__(self) -> str:
        return f"DeltaNetCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"
