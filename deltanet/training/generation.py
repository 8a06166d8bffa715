"""Text generation from a trained model: prompts in, text out, streamed as it is made.

Runs :func:`deltanet.models.decoding.decode` (on CUDA one captured step per token, token choice
inside the step; elsewhere eager steps) and turns ids into text with the run's tokenizer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["GenerationReport", "generate_text", "generate_texts"]


class _TextStream:
    """Incremental text of one row: the text is re-decoded from all new ids each time and only the
    stable suffix is emitted (a byte-level token can end mid UTF-8 character, decoded as U+FFFD
    until completed). Ids after EOS are dropped."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.printed = 0
        self.ended = False

    def put(self, token: int) -> None:
        if self.ended:
            return
        if token == self.tokenizer.eos_id:
            self.ended = True
            return
        self.ids.append(token)
        stable = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if len(stable) > self.printed:
            self.emit(stable[self.printed:])
            self.printed = len(stable)

    def end(self) -> None:
        text = self.text
        if len(text) > self.printed:
            self.emit(text[self.printed:])
            self.printed = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


@dataclass
class GenerationReport:
    """``texts``: one completion per prompt (without the prompt, cut at EOS); ``new_tokens``:
    tokens generated per row (EOS padding included); speeds over prefill + decode."""

    texts: list[str]
    new_tokens: int
    batch: int
    prefill_s: float
    decode_s: float
    cuda_graph: bool
    steady_tokens_per_s: float | None = None  # the replays after the graph's capture (``DecodeResult``)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.batch * self.new_tokens / total if total > 0 else float("inf")

    def summary(self) -> str:
        per_step = self.batch * max(self.new_tokens - 1, 0) / self.decode_s if self.decode_s > 0 else float("inf")
        return (f"{self.batch * self.new_tokens} tokens ({self.batch} x {self.new_tokens}) in "
                f"{self.prefill_s + self.decode_s:.2f} s: {self.tokens_per_s:,.1f} tokens/s "
                f"(prefill {self.prefill_s:.3f} s, decode {per_step:,.1f} tokens/s"
                + (f", {self.steady_tokens_per_s:,.1f} after the graph's capture" if self.steady_tokens_per_s else "")
                + f", cuda graph {'on' if self.cuda_graph else 'off'})")


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 0.8,
                   top_p: float = 0.95, top_k: int = 0, seed: int = 0,
                   emit: Callable[[int, str], None] | None = None) -> GenerationReport:
    """Continue every prompt (one batch, left padded); ``emit(row, text)`` receives each row's
    text as it is made. Each prompt is preceded by EOS, which begins every document in training;
    ids beyond the tokenizer's vocabulary are never chosen; ``temperature == 0`` is greedy.

    >>> # model, tokenizer from a run:  generate_texts(model, tok, ["def ", "class "], max_new_tokens=32).texts
    """
    from deltanet.models.decoding import decode
    from deltanet.models.sampling import SamplingConfig

    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = model.config.vocab_size
    sampling = SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=int(seed),
                              vocab_limit=tokenizer.vocab_size if vocab > tokenizer.vocab_size else None)
    device = next(model.parameters()).device
    rows = [[tokenizer.eos_id] + ids for ids in tokenizer.encode_batch(list(prompts))]
    S = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), S), tokenizer.eos_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's last token is at the same position
        input_ids[i, S - len(r):] = torch.tensor(r)
        mask[i, S - len(r):] = 1
    streams = [_TextStream(tokenizer, (lambda s, i=i: emit(i, s)) if emit else (lambda s: None))
               for i in range(len(rows))]

    def on_tokens(ids: torch.Tensor) -> None:
        for stream, t in zip(streams, ids.tolist()):
            stream.put(t)

    res = decode(model, input_ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, sampling=sampling,
                 eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id, on_tokens=on_tokens)
    for stream in streams:
        stream.end()
    return GenerationReport(texts=[s.text for s in streams], new_tokens=res.tokens.shape[1], batch=len(rows),
                            prefill_s=res.prefill_s, decode_s=res.decode_s, cuda_graph=res.graph,
                            steady_tokens_per_s=res.steady_tokens_per_s)


def generate_text(model, tokenizer, prompt: str, *, max_new_tokens: int = 128, temperature: float = 0.8,
                  top_p: float = 0.95, top_k: int = 0, seed: int = 0, stream: bool = False,
                  emit: Callable[[str], None] | None = None) -> str:
    """Continue ``prompt``; returns the generated text (without the prompt). ``stream``: write it
    to ``emit`` (default stdout) as it is made. See :func:`generate_texts`."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if emit is None:
        def emit(s: str) -> None:
            sys.stdout.write(s)
            sys.stdout.flush()
    report = generate_texts(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed,
                            emit=(lambda _row, s: emit(s)) if stream else None)
    return report.texts[0]


def read_prompts(path: str) -> list[str]:
    """Prompts of a ``--batch-file``: one per line (``\\n`` inside a line stands for a newline);
    blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"--batch-file {path}: no prompts (one per line)")
    return prompts


def print_generation(model, tokenizer, prompts: list[str], *, out=None, err=None, **kw) -> GenerationReport:
    """What ``deltanet generate`` prints: one prompt streams its continuation to ``out`` token by
    token; several (a batch) print as ``### i`` blocks when done; the speed goes to ``err``."""
    out, err = out or sys.stdout, err or sys.stderr
    if len(prompts) == 1:
        out.write(prompts[0])
        out.flush()

        def emit(_row: int, s: str) -> None:
            out.write(s)
            out.flush()
        report = generate_texts(model, tokenizer, prompts, emit=emit, **kw)
        out.write("\n")
    else:
        report = generate_texts(model, tokenizer, prompts, **kw)
        for i, (p, t) in enumerate(zip(prompts, report.texts)):
            out.write(f"### {i}\n{p}{t}\n")
    out.flush()
    err.write(report.summary() + "\n")
    return report
