"""Tokenizers for training: a byte-level BPE trained on the corpus, plain bytes, or any tokenizer.json.

All share one small interface (``encode_batch``, ``decode``, ``eos_id``, ``vocab_size``,
``token_bytes``, ``fingerprint``, ``save``) so the data pipeline, the trainer and the
evaluation don't care which one is in use. A run directory stores the tokenizer as
``tokenizer.json`` (the ``tokenizers`` format; absent for ``bytes``) plus
``tokenizer_meta.json`` (kind, EOS id), and :func:`load_tokenizer` reads it back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "TokenizerError", "load_tokenizer", "make_tokenizer", "train_bpe"]

EOS_TOKEN = "<|endoftext|>"
META_FILE = "tokenizer_meta.json"


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or loaded; the CLI prints it as one line."""


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, EOS is 256.

    >>> t = ByteTokenizer()
    >>> t.encode_batch(["hé"])
    [[104, 195, 169]]
    >>> t.decode([104, 195, 169, 256])
    'hé'
    """

    kind = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for EOS): the denominator of bits per byte."""
        out = np.ones(self.vocab_size, dtype=np.int64)
        out[self.eos_id] = 0
        return out

    def fingerprint(self) -> str:
        return "bytes-v1"

    def save(self, directory: str | Path) -> None:
        _write_meta(Path(directory), {"kind": self.kind, "eos_id": self.eos_id})


class HFTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (our trained BPE, a tokenizer.json, or an HF tokenizer)."""

    def __init__(self, tok, eos_id: int, kind: str = "tokenizers"):
        self.tok = tok
        self.kind = kind
        self.eos_id = int(eos_id)
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        if not 0 <= self.eos_id < self.vocab_size:
            raise TokenizerError(f"eos id {eos_id} outside the vocabulary (size {self.vocab_size})")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust-side parallel encode; special tokens in the text are not treated as control tokens
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, exact for byte-level BPE (special tokens count 0)."""
        out = np.zeros(self.vocab_size, dtype=np.int64)
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        for piece, i in self.tok.get_vocab(with_added_tokens=True).items():
            if piece in special:
                continue
            if all(c in inverse for c in piece):  # byte-level alphabet: one char per byte
                out[i] = len(piece)
            else:  # other models (sentencepiece-style "▁"): count the decoded text
                out[i] = len(self.tok.decode([i]).encode("utf-8"))
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        _write_meta(directory, {"kind": self.kind, "eos_id": self.eos_id})


def train_bpe(texts: Iterator[str], vocab_size: int) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE with ``tokenizers``; ``<|endoftext|>`` is EOS.

    >>> t = train_bpe(iter(["def f(x):\\n    return x\\n"] * 50), vocab_size=300)
    >>> t.decode(t.encode_batch(["def g(): return 1"])[0])
    'def g(): return 1'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, tok.token_to_id(EOS_TOKEN), kind="bpe")


def make_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """Build a ready tokenizer from ``"bytes"``, a tokenizer.json path/dir, or an HF name.

    (``"bpe"`` needs training data: see :func:`train_bpe`.)
    """
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / META_FILE).is_file():
        return load_tokenizer(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        return HFTokenizer(tok, _find_eos(tok, path), kind="tokenizers")
    if spec.endswith(".json") or "/" not in spec and "." in spec:
        raise TokenizerError(f"tokenizer file not found: {spec}")
    return _from_hf_name(spec)


def _from_hf_name(name: str) -> HFTokenizer:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:
        raise TokenizerError(f"cannot load tokenizer {name!r} (not 'bpe', 'bytes', a tokenizer.json, "
                             f"or a reachable Hugging Face name): {str(e).splitlines()[0]}") from None
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(f"tokenizer {name!r} has no fast (tokenizers) backend")
    if hf.eos_token_id is None:
        raise TokenizerError(f"tokenizer {name!r} defines no EOS token, which packing needs")
    return HFTokenizer(hf.backend_tokenizer, hf.eos_token_id, kind="tokenizers")


def _find_eos(tok, path: Path) -> int:
    for name in (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise TokenizerError(f"tokenizer {path} has no EOS token (looked for {EOS_TOKEN}, </s>, <eos>)")


def load_tokenizer(directory: str | Path) -> ByteTokenizer | HFTokenizer:
    """Load the tokenizer a run or checkpoint directory stores."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise TokenizerError(f"no tokenizer in {directory} (missing {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
        if meta["kind"] == "bytes":
            return ByteTokenizer()
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        return HFTokenizer(tok, meta["eos_id"], kind=meta["kind"])
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"corrupt tokenizer in {directory}: {str(e).splitlines()[0]}") from None


def _write_meta(directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).write_text(json.dumps(meta) + "\n")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-char map, which ``ByteLevel`` uses for its vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
