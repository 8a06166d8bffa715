"""Corpora, the token cache, and packed batches.

Pipeline: a data spec becomes a :class:`Corpus` (documents in a deterministic order, each
sent to the train or the validation split by its index or, for ``python-site``, its content
hash), the documents are tokenised once by worker processes into a cached uint16/uint32
memmap per split (key = corpus + tokenizer; :mod:`deltanet.training.token_cache`), and
:class:`PackedTokens` cuts that stream into fixed-length rows.

Unusable documents are skipped and counted (``meta.json``'s ``skipped``): undecodable UTF-8,
binary (NUL bytes), empty, over 16 MB, a line over 100 kB, unreadable (dangling symlinks,
FIFOs, permissions), bad ``.jsonl`` records, and exact duplicates (content hash; the first
copy in corpus order is kept). Directory walks follow each symlinked directory once.

Packing: every document is preceded by EOS (``EOS d1 EOS d2 EOS d3 ...``), so EOS plays BOS.
A batch row may hold the tail of one document and the head of the next; :func:`make_batch`
flattens ``[B, T]`` to ``[1, B*T]`` with ``cu_seqlens`` at row starts and at every EOS, so the
recurrent state of one document never reaches the next (the last token of a document still
learns to predict the EOS that follows it).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import site
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .pipeline import SKIP_REASONS, Limits, digest_of, glob_files, human_bytes, read_document, walk_files
from .token_cache import TokenCache, build_token_cache, format_stats, prepare_tokenizer, tokenizer_sample

__all__ = ["Corpus", "DataError", "PackedTokens", "TokenCache", "build_token_cache", "eval_positions", "format_stats",
           "make_batch", "open_corpus", "prepare_tokenizer", "tokenizer_sample"]

CACHE_VERSION = 2  # 2: duplicates dropped, hostile files skipped, parallel build


class DataError(ValueError):
    """Missing or unusable data; the CLI prints it as one line."""


@dataclass
class Corpus:
    """Documents from one spec, in a deterministic order, each sent to the train or val split.

    ``split_by="index"`` (file, directory, glob, ``.jsonl``, ``hf:`` specs): document ``j`` is
    held out when ``j % every == every - 1`` (whole files; lines for a single text file).
    ``split_by="hash"`` (``python-site``): a document is held out when a hash of its content
    falls below ``val_fraction``, so adding files never moves an existing file between splits.

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
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    split_by: str = "index"
    roots: list[tuple[str, Path]] = field(default_factory=list)  # (label, dir) for relative names
    limits: Limits = field(default_factory=Limits)
    _sizes: list[int] | None = field(default=None, repr=False)

    @functools.cached_property
    def every(self) -> int:  # cached: is_val runs once per document
        every = max(2, round(1.0 / self.val_fraction))
        if len(self.files) >= 2 and all(f.suffix != ".jsonl" for f in self.files):
            every = min(every, len(self.files))  # a few files: still hold one out
        return every

    def is_val(self, j: int, digest: bytes = b"") -> bool:
        if self.split_by == "hash":
            return int.from_bytes(digest[:8], "big") < self.val_fraction * 2**64
        return j % self.every == self.every - 1

    def parallel(self) -> bool:
        """Whether the worker pool can tokenise this corpus (not ``hf:``, not one plain file)."""
        return self.hf is None and not (len(self.files) == 1 and self.files[0].suffix != ".jsonl")

    def sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = [_stat(f)[0] for f in self.files]
        return self._sizes

    def approx_bytes(self) -> int:
        return sum(max(0, s) for s in self.sizes())

    def fingerprint(self) -> str:
        """The cache key's corpus half: paths, sizes, mtimes, split and limits (this machine only)."""
        h = hashlib.sha256(f"v{CACHE_VERSION}|{self.val_fraction}|{self.hf}|{self.split_by}|{self.limits.key()}".encode())
        files = self.files
        if self.hf is not None and Path(self.hf[0]).is_dir():  # a local dataset: key on its files too
            files = sorted(p for p in Path(self.hf[0]).rglob("*") if p.is_file())
        for f in files:
            size, mtime = _stat(f)
            h.update(f"|{os.path.realpath(f)}|{size}|{mtime}".encode())
        return h.hexdigest()[:16]

    def list_fingerprint(self) -> str:
        """Hash of the file list as names relative to the corpus roots + sizes: equal on two machines
        (or two runs) that see the same files, wherever the files live."""
        h = hashlib.sha256(self.spec.encode() if not self.files else b"files")
        for f, size in zip(self.files, self.sizes()):
            h.update(f"|{self._relative(f)}|{size}".encode())
        return h.hexdigest()[:12]

    def _relative(self, f: Path) -> str:
        for label, root in self.roots:
            try:
                return f"{label}/{f.relative_to(root).as_posix()}"
            except ValueError:
                continue
        return f.name

    def describe(self) -> str:
        if self.hf is not None:
            return f"data {self.spec}: a Hugging Face dataset"
        return (f"data {self.spec}: {len(self.files):,} files, {human_bytes(self.approx_bytes())}, "
                f"file list fingerprint {self.list_fingerprint()}")

    def iter_texts(self, split: str) -> Iterator[str]:
        """Yield the documents of ``split`` ("train" or "val") in a fixed order (one process;
        :func:`build_token_cache` is the parallel path, which also drops duplicates)."""
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
                    if self._is_val_text(j, text) == want_val:
                        yield text
                    j += 1
                continue
            if self.split_by == "hash":  # the split needs the content: read, count skips once
                reason, digest, text = read_document(f, self.limits)
                if reason is not None and not want_val:
                    self.skipped[reason] += 1
                if text is not None and self.is_val(j, digest) == want_val:
                    yield text
            elif self.is_val(j) == want_val:  # decide before reading: the other split's files stay unread
                text = self._read(f)
                if text:
                    yield text
            j += 1

    def _is_val_text(self, j: int, text: str) -> bool:
        return self.is_val(j, digest_of(text.encode("utf-8", errors="surrogatepass")) if self.split_by == "hash" else b"")

    def _read(self, f: Path) -> str | None:
        reason, _, text = read_document(f, self.limits)
        if reason is not None:
            self.skipped[reason] += 1
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
            if text and self.is_val(j) == want_val:
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


def python_site_roots() -> list[tuple[str, Path]]:
    """``(label, dir)``: the standard library, then each site-packages directory of this interpreter."""
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    sites = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        sites.append(site.getusersitepackages())
    seen = {os.path.realpath(roots[0][1])}
    for d in sites:
        if os.path.isdir(d) and os.path.realpath(d) not in seen:
            seen.add(os.path.realpath(d))
            roots.append((f"site{len(roots) - 1}", Path(d)))
    return roots


def python_site_files(roots: list[tuple[str, Path]]) -> list[Path]:
    """Every ``.py`` file under ``roots`` (the stdlib with its tests; site-packages walked on their own)."""
    out: list[Path] = []
    for label, root in roots:
        skip = {"__pycache__"} | ({"site-packages", "dist-packages"} if label == "stdlib" else set())
        out.extend(walk_files(root, keep=lambda n: n.endswith(".py"), skip_dir=skip.__contains__))
    return out


def open_corpus(spec: str, val_fraction: float = 0.05) -> Corpus:
    """Resolve a data spec: ``stdlib`` / ``stdlib-all`` / ``python-site``, a file, a directory, a
    glob, a ``.jsonl``, ``hf:NAME[:CONFIG]`` (Hugging Face hub) or ``hf:DIR`` (``save_to_disk``)."""
    if spec in ("stdlib", "stdlib-all"):  # stdlib-all: with the stdlib's test suites (2.5x the text)
        files = stdlib_files(include_tests=spec == "stdlib-all")
        if not files:
            raise DataError(f"no standard-library sources found under {sysconfig.get_paths()['stdlib']}")
        return Corpus(spec, files, val_fraction, roots=[("stdlib", Path(sysconfig.get_paths()["stdlib"]))])
    if spec == "python-site":  # every .py of this interpreter: stdlib (with tests) + site-packages
        roots = python_site_roots()
        files = python_site_files(roots)
        if not files:
            raise DataError("no Python sources found in the standard library or site-packages")
        return Corpus(spec, files, val_fraction, split_by="hash", roots=roots)
    if spec.startswith("hf:"):
        try:
            import datasets  # noqa: F401
        except ModuleNotFoundError:
            raise DataError("Hugging Face datasets need the 'datasets' package: pip install 'deltanet[datasets]'") from None
        name, _, config = spec[3:].partition(":")
        return Corpus(spec, [], val_fraction, hf=(name, config or None))
    path = Path(spec).expanduser()
    if any(c in spec for c in "*?["):
        files = glob_files(str(path))
        if not files:
            raise DataError(f"no files match {spec}")
        root = Path(*path.parts[:next(i for i, p in enumerate(path.parts) if glob.has_magic(p))])
    elif path.is_dir():
        files = walk_files(path, keep=lambda n: not n.startswith("."),
                           skip_dir=lambda d: d.startswith(".") or d == "__pycache__")
        if not files:
            raise DataError(f"data directory {spec} holds no files")
        root = path
    elif path.is_file():
        files, root = [path], path.parent
    else:
        raise DataError(f"data path not found: {spec}")
    return Corpus(spec, files, val_fraction, roots=[("data", root)])


def _stat(f: Path) -> tuple[int, int]:
    try:
        st = os.stat(f)
        return st.st_size, st.st_mtime_ns
    except OSError:  # dangling symlink, loop, no permission: listed, skipped when read
        return -1, -1


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
