"""Token choice on the device, with no host sync: greedy, temperature, top-k, top-p.

Sampling draws with the Gumbel-max trick, ``argmax(logits / T + G)`` with ``G = -log(-log U)``,
which picks token ``i`` with probability ``softmax(logits / T)_i`` exactly. The uniforms ``U``
are not drawn from a stateful generator but computed by an integer hash of ``(seed, position,
row, token id)`` (:func:`seeded_uniform`): a captured CUDA graph replays them without generator
bookkeeping, the eager and the captured step draw the same numbers, and a given seed gives the
same tokens on every run, device and batch size that computes the same logits.

What matches Hugging Face's ``generate(do_sample=True)`` and what does not:

- greedy (``temperature=0``): the same tokens (argmax of the same logits);
- the filtered distribution (:func:`filter_logits`): temperature, then top-k (ties at the k-th
  value kept), then top-p (the smallest prefix of the sorted tokens whose mass reaches ``p``,
  at least one token), in the order and with the rules of transformers' warpers: equal up to
  floating-point rounding at the top-p boundary (tested);
- the drawn tokens: **not** the same. Hugging Face draws with ``torch.multinomial`` from the
  global torch generator, a different random stream; our draws follow the same distribution
  (tested statistically) from the hash above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "choose_tokens", "filter_logits", "seeded_uniform"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0``: greedy; ``top_k == 0`` and
    ``top_p == 1``: no filtering. ``vocab_limit``: ids at or above it are never chosen (padding
    rows of an embedding larger than the tokenizer)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    vocab_limit: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if self.vocab_limit is not None and (not isinstance(self.vocab_limit, int) or self.vocab_limit < 1):
            raise ValueError(f"vocab_limit must be a positive int or None, got {self.vocab_limit!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_M32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (xor-shift / multiply rounds) of a Python int or an int64 tensor
    holding 32-bit values. The multipliers are below 2**31, so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def seeded_uniform(seed: int, position: torch.Tensor | int, batch: int, vocab: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniforms in (0, 1), ``[batch, vocab]`` float32, a pure function of ``(seed, position, row,
    token id)``; ``position`` may be a device tensor (read inside a captured graph).

    Example::

        >>> u = seeded_uniform(0, 5, 2, 1000)
        >>> bool((u > 0).all() and (u < 1).all()), torch.equal(u, seeded_uniform(0, 5, 2, 1000))
        (True, True)
    """
    if batch * vocab >= 2**31:
        raise ValueError(f"seeded_uniform: batch * vocab must be < 2**31, got {batch} * {vocab}")
    # no host-to-device copy here (it cannot be captured): the seed is hashed in Python, and an
    # int position too; a tensor position is already on the device
    key = _mix32((position & _M32) ^ _mix32(seed & _M32))
    cell = torch.arange(batch * vocab, dtype=torch.long, device=device).view(batch, vocab)
    x = _mix32(_mix32(cell ^ key) ^ ((seed >> 32) & _M32))
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)  # 24 bits: exact in float32, never 0 or 1


def filter_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """``[B, V]`` logits divided by the temperature, with ``-inf`` outside top-k / top-p and at
    ids ``>= vocab_limit``; float32 (float64 for float64 logits). Greedy configs skip the
    temperature."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if cfg.vocab_limit is not None and cfg.vocab_limit < x.shape[-1]:
        x = x.clone()
        x[:, cfg.vocab_limit:] = float("-inf")
    if cfg.greedy:
        return x
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = before >= cfg.top_p
        drop[:, 0] = False  # keep at least the most likely token
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return x


def choose_tokens(logits: torch.Tensor, cfg: SamplingConfig, position: torch.Tensor | int) -> torch.Tensor:
    """Next token ids ``[B]`` (long) from ``[B, V]`` logits, entirely on the device.
    ``position``: the position the chosen tokens take (keys the sampling noise).

    Example::

        >>> logits = torch.tensor([[0.0, 3.0, 1.0]])
        >>> choose_tokens(logits, SamplingConfig(), 0).tolist()
        [1]
    """
    x = filter_logits(logits, cfg)
    if cfg.greedy:
        return x.argmax(-1)
    u = seeded_uniform(cfg.seed, position, x.shape[0], x.shape[1], x.device)
    gumbel = -torch.log(-torch.log(u))
    return (x + gumbel.to(x.dtype)).argmax(-1)
