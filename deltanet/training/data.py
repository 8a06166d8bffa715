"""Corpora, the token cache, and packed batches.

Pipeline: a data spec becomes a :class:`Corpus` (documents in a deterministic order, each
sent to the train or the validation split by its index), the documents are tokenised once
into a cached uint16/uint32 memmap per split (key = corpus + tokenizer), and
:class:`PackedTokens` cuts that stream into fixed-length rows.

Packing: every document is preceded by EOS (``EOS d1 EOS d2 EOS d3 ...``), so EOS plays BOS.
A batch row may hold the tail of one document and the head of the next; :func:`make_batch`
flattens ``[B, T]`` to ``[1, B*T]`` with ``cu_seqlens`` at row starts and at every EOS, so the
recurrent state of one document never reaches the next (the last token of a document still
learns to predict the EOS that follows it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = ["Corpus", "DataError", "PackedTokens", "TokenCache", "build_token_cache", "eval_positions", "make_batch",
           "open_corpus"]

CACHE_VERSION = 1


class DataError(ValueError):
    """Missing or unusable data; the CLI prints it as one line."""


@dataclass
class Corpus:
    """Documents from one spec, split deterministically: document ``j`` is held out when
    ``j % every == every - 1`` (whole files for file corpora; lines for a single text file).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for i in range(4): _ = (d / f"{i}.txt").write_text(f"doc {i}")
    >>> c = open_corpus(str(d), val_fraction=0.5)
    >>> list(c.iter_texts("train")), list(c.iter_texts("val"))
    (['doc 0', 'doc 2'], ['doc 1', 'doc 3'])
    """

    spec: str
    files: list[Path] = field(default_factory=list)
    val_fraction: float = 0.05
    hf: tuple[str, str | None] | None = None
    skipped: dict[str, int] = field(default_factory=lambda: {"non_utf8": 0, "bad_json": 0, "empty": 0})

    @property
    def every(self) -> int:
        every = max(2, round(1.0 / self.val_fraction))
        if len(self.files) >= 2 and all(f.suffix != ".jsonl" for f in self.files):
            every = min(every, len(self.files))  # a few files: still hold one out
        return every

    def _is_val(self, j: int) -> bool:
        return j % self.every == self.every - 1

    def approx_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"v{CACHE_VERSION}|{self.val_fraction}|{self.hf}".encode())
        files = self.files
        if self.hf is not None and Path(self.hf[0]).is_dir():  # a local dataset: key on its files too
            files = sorted(p for p in Path(self.hf[0]).rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def iter_texts(self, split: str) -> Iterator[str]:
        """Yield the documents of ``split`` ("train" or "val") in a fixed order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        want_val = split == "val"
        if self.hf is not None:
            yield from self._iter_hf(want_val)
            return
        plain = [f for f in self.files if f.suffix != ".jsonl"]
        if len(self.files) == 1 and len(plain) == 1:
            yield from self._iter_single_file(plain[0], want_val)
            return
        j = 0
        for f in self.files:
            if f.suffix == ".jsonl":
                for text in self._iter_jsonl(f, count_skips=not want_val):
                    if self._is_val(j) == want_val:
                        yield text
                    j += 1
                continue
            if self._is_val(j) == want_val:  # decide before reading: the other split's files stay unread
                text = self._read(f)
                if text:
                    yield text
            j += 1

    def _read(self, f: Path) -> str | None:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            self.skipped["non_utf8"] += 1
            return None
        if not text.strip():
            self.skipped["empty"] += 1
            return None
        return text

    def _iter_single_file(self, f: Path, want_val: bool) -> Iterator[str]:
        # One file can't be split by file: hold out its last val_fraction of lines instead.
        text = self._read(f)
        if text is None:
            return
        lines = text.splitlines(keepends=True)
        cut = len(lines) - max(1, round(len(lines) * self.val_fraction)) if len(lines) > 1 else len(lines)
        part = "".join(lines[cut:] if want_val else lines[:cut])
        if part:
            yield part

    def _iter_jsonl(self, f: Path, count_skips: bool) -> Iterator[str]:
        # both splits parse every line; count bad ones in the train pass only
        with f.open("rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw.decode("utf-8"))["text"]
                except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                    self.skipped["bad_json"] += count_skips
                    continue
                if isinstance(text, str) and text:
                    yield text
                else:
                    self.skipped["empty"] += count_skips

    def _iter_hf(self, want_val: bool) -> Iterator[str]:
        import datasets  # checked in open_corpus

        name, config = self.hf
        try:
            if Path(name).is_dir():  # a dataset saved with save_to_disk
                ds = datasets.load_from_disk(name)
            else:
                ds = datasets.load_dataset(name, config)
        except Exception as e:
            raise DataError(f"cannot load dataset {name!r}: {str(e).strip().splitlines()[0]}") from None
        if isinstance(ds, datasets.Dataset):
            ds = datasets.DatasetDict({"train": ds})
        if "train" not in ds or "text" not in ds["train"].column_names:
            raise DataError(f"dataset {name!r} needs a 'train' split with a 'text' column")
        val_split = next((s for s in ("validation", "test") if s in ds), None)
        if val_split is not None:
            rows = ds[val_split] if want_val else ds["train"]
            yield from (t for t in rows["text"] if t)
            return
        for j, text in enumerate(ds["train"]["text"]):
            if text and self._is_val(j) == want_val:
                yield text


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """The running interpreter's standard-library ``.py`` files, sorted.

    Third-party packages and the stdlib's own test suites are left out: the tests are about
    60% of the bytes (tokenising them would double the first run of ``deltanet train``) and
    include deliberately odd files (bad encodings, huge literals) that teach little.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file())


def open_corpus(spec: str, val_fraction: float = 0.05) -> Corpus:
    """Resolve a data spec: ``stdlib`` / ``stdlib-all``, a file, a directory, a glob, a ``.jsonl``,
    ``hf:NAME[:CONFIG]`` (Hugging Face hub) or ``hf:DIR`` (a dataset saved with ``save_to_disk``)."""
    if spec in ("stdlib", "stdlib-all"):  # stdlib-all: with the stdlib's test suites (2.5x the text)
        files = stdlib_files(include_tests=spec == "stdlib-all")
        if not files:
            raise DataError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}")
        return Corpus(spec, files, val_fraction)
    if spec.startswith("hf:"):
        try:
            import datasets  # noqa: F401
        except ModuleNotFoundError:
            raise DataError("Hugging Face datasets need the 'datasets' package: pip install 'deltanet[datasets]'") from None
        name, _, config = spec[3:].partition(":")
        return Corpus(spec, [], val_fraction, hf=(name, config or None))
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {spec}")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise DataError(f"data directory {spec} holds no files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data path not found: {spec}")
    return Corpus(spec, files, val_fraction)


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part == "__pycache__" for part in rel.parts)


@dataclass
class TokenCache:
    """A tokenised corpus on disk: ``train.bin`` / ``val.bin`` plus ``meta.json``."""

    path: Path
    meta: dict

    def tokens(self, split: str) -> np.memmap:
        n = self.meta[f"{split}_tokens"]
        if n == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))


def build_token_cache(corpus: Corpus, tokenizer, cache_root: Path, progress: bool = True) -> TokenCache:
    """Tokenise ``corpus`` once; later calls with the same corpus + tokenizer reuse the files.

    Written into a temp directory and renamed, so a crash never leaves a half cache behind.
    """
    key = hashlib.sha256(f"{corpus.fingerprint()}|{tokenizer.fingerprint()}".encode()).hexdigest()[:20]
    final = Path(cache_root) / key
    if (final / "meta.json").is_file():
        return TokenCache(final, json.loads((final / "meta.json").read_text()))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    byte_len = tokenizer.token_bytes()
    meta: dict = {"spec": corpus.spec, "dtype": np.dtype(dtype).name, "eos_id": tokenizer.eos_id,
                  "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint()}
    bar = None
    if progress and corpus.approx_bytes() > 4_000_000:
        from tqdm.auto import tqdm

        bar = tqdm(total=corpus.approx_bytes(), unit="B", unit_scale=True, desc="tokenising", leave=False)
    for split in ("train", "val"):
        n_tok = n_doc = n_bytes = 0
        with open(tmp / f"{split}.bin", "wb") as fh:
            for batch in _batched(corpus.iter_texts(split), max_chars=2_000_000):
                for ids in tokenizer.encode_batch(batch):
                    arr = np.asarray([tokenizer.eos_id, *ids], dtype=dtype)
                    arr.tofile(fh)
                    n_tok += arr.size
                    n_bytes += int(byte_len[arr].sum())
                n_doc += len(batch)
                if bar is not None:
                    bar.update(sum(len(t) for t in batch))
            fh.flush()
            os.fsync(fh.fileno())
        meta.update({f"{split}_tokens": n_tok, f"{split}_docs": n_doc, f"{split}_bytes": n_bytes})
    if bar is not None:
        bar.close()
    meta["skipped"] = dict(corpus.skipped)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another process (rank) finished the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache(final, json.loads((final / "meta.json").read_text()))


def _batched(texts: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= max_chars or len(batch) >= 1024:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class PackedTokens:
    """Rows of ``seq_len`` tokens cut from a token stream, visited in a seeded order per epoch.

    Position ``p`` (a count of rows consumed so far, the resumable data state) maps to row
    ``perm(epoch = p // n_rows)[p % n_rows]``, so any process can jump to any point.

    >>> pt = PackedTokens(np.arange(10, dtype=np.uint16), seq_len=3, seed=0, shuffle=False)
    >>> pt.rows(np.array([0, 4])).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_rows = len(tokens) // seq_len
        self.seed = seed
        self.shuffle = shuffle
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _row_ids(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.n_rows)
        if not self.shuffle:
            return offsets
        out = np.empty_like(offsets)
        for e in np.unique(epochs):
            if e != self._perm_epoch:
                self._perm = np.random.default_rng([self.seed, int(e)]).permutation(self.n_rows)
                self._perm_epoch = int(e)
            sel = epochs == e
            out[sel] = self._perm[offsets[sel]]
        return out

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """``[len(positions), seq_len]`` int64 token rows for global positions."""
        ids = self._row_ids(np.asarray(positions, dtype=np.int64))
        starts = ids[:, None] * self.seq_len + np.arange(self.seq_len)[None, :]
        return self.tokens[starts].astype(np.int64)


def eval_positions(n_rows: int, n: int) -> np.ndarray:
    """``n`` row indices spread evenly over ``n_rows`` (all when ``n >= n_rows``).

    Validation on a subset should sample the whole held-out split, not its first files.

    >>> eval_positions(10, 4).tolist(), eval_positions(3, 8).tolist()
    ([0, 3, 6, 9], [0, 1, 2])
    """
    if n >= n_rows:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, n).round().astype(np.int64))


def make_batch(rows: np.ndarray, eos_id: int, doc_mask: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows ``[B, T]``.

    With ``doc_mask`` the batch is flattened to ``[1, B*T]`` and ``cu_seqlens`` marks every row
    start and every EOS; otherwise rows are fed as ``[B, T]``. ``labels[:, 0] = -100`` so the
    model's internal shift never predicts across a row boundary; both forms therefore train on
    exactly the same ``B * (T - 1)`` targets.

    >>> b = make_batch(np.array([[5, 0, 6], [7, 8, 0]]), eos_id=0)
    >>> b["input_ids"].tolist(), b["cu_seqlens"].tolist()
    ([[5, 0, 6, 7, 8, 0]], [0, 1, 3, 5, 6])
    """
    ids = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
    labels = ids.clone()
    labels[:, 0] = -100
    if not doc_mask:
        return {"input_ids": ids, "labels": labels}
    B, T = ids.shape
    flat = ids.reshape(1, B * T)
    starts = (flat[0] == eos_id).nonzero().flatten()
    bounds = torch.cat([torch.arange(0, B * T, T), starts, torch.tensor([B * T])])
    cu = torch.unique(bounds)  # sorted, deduplicated
    return {"input_ids": flat, "labels": labels.reshape(1, B * T), "cu_seqlens": cu.to(torch.int32)}
