"""The token cache: a corpus tokenised once into ``train.bin`` / ``val.bin`` + ``meta.json``.

:func:`build_token_cache` runs the worker pool of :mod:`deltanet.training.pipeline` over a
:class:`~deltanet.training.data.Corpus` and writes the documents in corpus order, dropping exact
duplicates (the first copy wins), into a temporary directory renamed into place at the end.
:func:`prepare_tokenizer` trains (or reuses) the BPE on a bounded sample of the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from .pipeline import (SKIP_REASONS, check_document, default_workers, digest_of, human_bytes, make_tasks,
                       run_tasks, task_bytes, tokenizer_state)

if TYPE_CHECKING:
    from .data import Corpus

__all__ = ["TokenCache", "build_token_cache", "format_stats", "prepare_tokenizer", "tokenizer_sample"]


@dataclass
class TokenCache:
    """A tokenised corpus on disk: ``train.bin`` / ``val.bin`` plus ``meta.json``."""

    path: Path
    meta: dict
    reused: bool = False  # found on disk, not built by this call

    def tokens(self, split: str) -> np.memmap:
        n = self.meta[f"{split}_tokens"]
        if n == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))


def build_token_cache(corpus: Corpus, tokenizer, cache_root: Path, progress: bool = True, workers: int = 0,
                      log=None) -> TokenCache:
    """Tokenise ``corpus`` once (``workers`` processes, 0 = all cores); later calls with the same
    corpus + tokenizer reuse the files. The token ids don't depend on ``workers``.

    Written into ``.tmp-<key>-<pid>`` and renamed, so an interrupted build never leaves a half
    cache behind; a temp directory whose process is gone is removed by the next build.
    ``log`` (a print-like callable) hears when a build starts, with or without a progress bar.
    """
    key = hashlib.sha256(f"{corpus.fingerprint()}|{tokenizer.fingerprint()}".encode()).hexdigest()[:20]
    final = Path(cache_root) / key
    if (final / "meta.json").is_file():
        return TokenCache(final, json.loads((final / "meta.json").read_text()), reused=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final.parent, key)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    workers = workers or default_workers()
    if log is not None:
        log(f"tokenising {human_bytes(corpus.approx_bytes())} with {workers} worker{'s' * (workers > 1)} into {final}")
    try:
        meta = _write_cache(corpus, tokenizer, tmp, progress, workers)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        # another process (rank) finished the same cache first: use theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TokenCache(final, json.loads((final / "meta.json").read_text()))


def _remove_stale_temps(root: Path, key: str) -> None:
    for d in root.glob(f".tmp-{key}-*"):
        try:
            os.kill(int(d.name.rsplit("-", 1)[1]), 0)
        except ProcessLookupError:  # its builder died (SIGKILL, power loss): never reused, just removed
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


class _Sink:
    """Appends documents to ``train.bin`` / ``val.bin``, dropping exact duplicates (first copy wins)."""

    def __init__(self, tmp: Path, corpus: Corpus):
        self.fh = {s: open(tmp / f"{s}.bin", "wb") for s in ("train", "val")}
        self.n = {f"{s}_{k}": 0 for s in ("train", "val") for k in ("tokens", "docs", "bytes")}
        self.seen: set[int] = set()
        self.skipped = corpus.skipped

    def add(self, digest: bytes, arr: np.ndarray, n_bytes: int, val: bool) -> None:
        h = int.from_bytes(digest[:8], "big")
        if h in self.seen:
            self.skipped["duplicate"] += 1
            return
        self.seen.add(h)
        split = "val" if val else "train"
        arr.tofile(self.fh[split])
        self.n[f"{split}_tokens"] += arr.size
        self.n[f"{split}_docs"] += 1
        self.n[f"{split}_bytes"] += n_bytes

    def close(self) -> None:
        for fh in self.fh.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()


def _write_cache(corpus: Corpus, tokenizer, tmp: Path, progress: bool, workers: int) -> dict:
    t0 = time.time()
    total = corpus.approx_bytes()
    bar = None
    if progress and total > 4_000_000:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenising ({workers} workers)", leave=False)
    corpus.skipped = dict.fromkeys(SKIP_REASONS, 0)  # this pass's counts (a BPE sample may have read some)
    sink = _Sink(tmp, corpus)
    try:
        if corpus.parallel():
            tasks = make_tasks(corpus.files, corpus.sizes())
            done = (lambda i: bar.update(task_bytes(tasks[i]))) if bar is not None else None
            j = 0
            for _, records in run_tasks(tasks, workers, tokenizer_state(tokenizer), corpus.limits, done):
                for reason, digest, arr, n_bytes, indexed in records:
                    if reason is not None:
                        corpus.skipped[reason] += 1
                    else:
                        sink.add(digest, arr, n_bytes, corpus.is_val(j, digest))
                    j += indexed
        else:  # hf: datasets / one plain file: in this process (the tokenizer itself is multi-threaded)
            workers = 1
            _write_serial(corpus, tokenizer, sink, bar)
    finally:
        sink.close()
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return {"spec": corpus.spec, "dtype": np.dtype(dtype).name, "eos_id": tokenizer.eos_id,
            "vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.fingerprint(), **sink.n,
            "skipped": dict(corpus.skipped), "files": len(corpus.files), "input_bytes": total,
            "file_list": corpus.list_fingerprint(), "split_by": corpus.split_by,
            "build": {"workers": workers, "seconds": round(seconds, 2),
                      "mb_per_s": round(total / 1e6 / max(seconds, 1e-9), 2)}}


def _write_serial(corpus: Corpus, tokenizer, sink: _Sink, bar) -> None:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    byte_len = tokenizer.token_bytes()
    for split in ("train", "val"):
        for batch in _batched(corpus.iter_texts(split), max_chars=2_000_000):
            keep = []
            for text in batch:
                data = text.encode("utf-8", errors="surrogatepass")
                reason, _ = check_document(data, corpus.limits)
                if reason in (None, "empty"):
                    keep.append((text, digest_of(data)))
                else:
                    corpus.skipped[reason] += 1
            for (_, digest), ids in zip(keep, tokenizer.encode_batch([t for t, _ in keep])):
                arr = np.asarray([tokenizer.eos_id, *ids], dtype=dtype)
                sink.add(digest, arr, int(byte_len[arr].sum()), split == "val")
            if bar is not None:
                bar.update(sum(len(t) for t in batch))


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


def tokenizer_sample(corpus: Corpus, max_bytes: int, workers: int = 0) -> list[str]:
    """Up to ``max_bytes`` of training documents for the BPE, spread over the whole corpus.

    File corpora: files in a fixed pseudo-random order (a hash of their names), read in parallel,
    skipping held-out, unusable and duplicate documents. Other corpora: the first training texts.
    """
    if not corpus.parallel() or any(f.suffix == ".jsonl" for f in corpus.files):
        out, total = [], 0
        for text in corpus.iter_texts("train"):
            out.append(text)
            total += len(text.encode("utf-8", errors="surrogatepass"))
            if total >= max_bytes:
                break
        return out
    order = sorted(range(len(corpus.files)), key=lambda i: digest_of(corpus._relative(corpus.files[i]).encode()))
    sizes = corpus.sizes()
    tasks = make_tasks([corpus.files[i] for i in order], [sizes[i] for i in order])
    out, total, seen, k = [], 0, set(), 0
    gen = run_tasks(tasks, workers or default_workers(), None, corpus.limits)
    try:
        for _, records in gen:
            for reason, digest, text, n_bytes, _ in records:
                j = order[k]
                k += 1
                if reason is not None or digest in seen or corpus.is_val(j, digest) or total >= max_bytes:
                    continue
                seen.add(digest)
                out.append(text)
                total += n_bytes
            if total >= max_bytes:
                break
    finally:
        gen.close()
    return out


def prepare_tokenizer(dc, corpus: Corpus, log=print):
    """The tokenizer ``dc`` (a DataConfig) asks for. A BPE is trained on :func:`tokenizer_sample`
    and kept next to the token caches (keyed by corpus, vocabulary and sample size), so
    ``deltanet data prepare`` and a later ``deltanet train`` share it, and with it the token cache."""
    from .tokenizer import load_tokenizer, make_tokenizer, train_bpe

    if dc.tokenizer != "bpe":
        return make_tokenizer(dc.tokenizer)
    key = hashlib.sha256(f"bpe-v1|{corpus.fingerprint()}|{dc.vocab_size}|{dc.tokenizer_train_bytes}".encode())
    where = dc.resolved_cache_dir() / "tokenizers" / key.hexdigest()[:20]
    if (where / "tokenizer_meta.json").is_file():
        log(f"BPE tokenizer: reused {where}")
        return load_tokenizer(where)
    t0 = time.time()
    sample = tokenizer_sample(corpus, dc.tokenizer_train_bytes, dc.data_workers)
    n_bytes = sum(len(t.encode("utf-8", errors="surrogatepass")) for t in sample)
    t1 = time.time()
    tok = train_bpe(iter(sample), dc.vocab_size)
    log(f"trained a byte-level BPE tokenizer ({tok.vocab_size} tokens) on a {human_bytes(n_bytes)} sample "
        f"({len(sample):,} documents; read in {t1 - t0:.1f}s, trained in {time.time() - t1:.1f}s)")
    tmp = where.parent / f".tmp-{where.name}-{os.getpid()}"
    try:
        tok.save(tmp)
        os.replace(tmp, where)
    except OSError:
        pass  # another process saved the same tokenizer first, or the cache dir is read-only
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def format_stats(meta: dict) -> str:
    """One line of corpus statistics from a cache's meta.json."""
    skipped = ", ".join(f"{v:,} {k}" for k, v in meta["skipped"].items() if v) or "none"
    b = meta.get("build", {})
    rate = f"; tokenised {human_bytes(meta.get('input_bytes', 0))} in {b['seconds']:.1f}s = {b['mb_per_s']:.1f} MB/s " \
           f"with {b['workers']} workers" if b else ""
    return (f"{meta.get('files', 0):,} files, {meta['train_docs']:,} train / {meta['val_docs']:,} val documents, "
            f"{meta['train_tokens']:,} / {meta['val_tokens']:,} tokens, "
            f"{meta['train_bytes'] + meta['val_bytes']:,} bytes (skipped: {skipped}){rate}")
