"""Text generation from a trained model: HF ``generate`` with a streamer that prints as it goes."""

from __future__ import annotations

import sys
from typing import Callable

import torch

__all__ = ["generate_text"]


class _Streamer:
    """An HF streamer (``put`` / ``end``) that decodes the growing output with our tokenizer.

    The text is re-decoded from all new ids each time and only the stable suffix is emitted:
    a byte-level token can end mid UTF-8 character (decoded as U+FFFD until completed).
    """

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer = tokenizer
        self.emit = emit
        self.ids: list[int] = []
        self.printed = 0
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first hands over the prompt
            self.seen_prompt = True
            return
        self.ids.extend(int(i) for i in value.flatten().tolist())
        text = self.tokenizer.decode(self.ids)
        stable = text.rstrip("\ufffd")
        if len(stable) > self.printed:
            self.emit(stable[self.printed:])
            self.printed = len(stable)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
                  top_p: float = 0.95, seed: int = 0, stream: bool = False,
                  emit: Callable[[str], None] | None = None) -> str:
    """Continue ``prompt``; returns the generated text (without the prompt).

    The prompt is preceded by EOS, which begins every document in training. Padding ids beyond
    the tokenizer's vocabulary are suppressed. ``temperature == 0`` decodes greedily.

    >>> # model, tokenizer from a run:  generate_text(model, tok, "def ", max_new_tokens=32)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    ids = [tokenizer.eos_id] + tokenizer.encode_batch([prompt])[0]
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if emit is None:
        def emit(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()
    streamer = _Streamer(tokenizer, emit if stream else (lambda s: None))
    vocab = model.config.vocab_size
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id, streamer=streamer)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    if vocab > tokenizer.vocab_size:
        kwargs["suppress_tokens"] = list(range(tokenizer.vocab_size, vocab))
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    try:
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    finally:
        model.train(was_training)
    return streamer.text
