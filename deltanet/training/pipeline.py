"""Corpus files -> token cache, tokenised in parallel worker processes.

The parent process lists the files and cuts them into *tasks* (a few MB of files, or a byte
range of a ``.jsonl``); each worker reads its task's files itself (the parent never holds the
corpus), checks them (:func:`check_document`), tokenises them and sends back one record per
document: ``(reason, digest, tokens, n_bytes, indexed)``. The parent consumes the records in task
order through a bounded window of outstanding tasks, so what it writes (document order, the
train/val split, which copy of a duplicate survives) does not depend on the number of workers:
the token ids are byte-identical to a one-worker run. Output goes to a temporary directory that
is renamed into place at the end (see :func:`deltanet.training.data.build_token_cache`).

Workers are forked (cheap: ``import deltanet`` pulls in torch) with ``TOKENIZERS_PARALLELISM``
off, so a ``tokenizers`` Rust thread pool used by the parent is never touched in a child (the
classic deadlock after fork); ``DELTANET_DATA_START_METHOD=forkserver|spawn`` picks another
start method. On Linux a worker dies with its parent (``PR_SET_PDEATHSIG``), so a killed build
leaves no orphans behind.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

__all__ = ["Limits", "SKIP_REASONS", "check_document", "default_workers", "human_bytes", "glob_files", "run_tasks", "walk_files"]

# Why a document was left out; every reason is counted in the cache's meta.json.
SKIP_REASONS = ("non_utf8", "binary", "empty", "too_large", "long_line", "unreadable", "bad_json", "duplicate")
TASK_BYTES = 2_000_000  # files per task: about this many bytes (fewer tasks = less IPC; more = better balance)
TASK_FILES = 256
JSONL_TASK_BYTES = 8_000_000


@dataclass(frozen=True)
class Limits:
    """Documents beyond these are skipped (and counted), not tokenised.

    A multi-MB line is generated data (minified code, base64 blobs, huge literal tables); it
    teaches little and a byte-level BPE spends super-linear time on one enormous "word".
    """

    max_doc_bytes: int = 16 * 2**20
    max_line_bytes: int = 100_000

    def key(self) -> str:
        return f"{self.max_doc_bytes}/{self.max_line_bytes}"


def human_bytes(n: int) -> str:
    """``"423.1 MB"``, ``"17.9 kB"``: log lines for corpora of any size."""
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def default_workers() -> int:
    """All the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# -- listing files ---------------------------------------------------------------------------
def walk_files(root: Path, keep: Callable[[str], bool] = lambda name: True,
               skip_dir: Callable[[str], bool] = lambda name: False) -> list[Path]:
    """Every non-directory entry under ``root`` whose name passes ``keep``, sorted.

    Symlinked directories are followed once each (a visited set of device + inode), so a symlink
    loop ends the walk instead of recursing until ELOOP. Symlinked, dangling or special files
    are listed: the reader decides (and counts) what cannot be read.
    """
    return sorted(Path(d, f) for d, names in _walk(str(root), skip_dir) for f in names if keep(f))


def _walk(root: str, skip_dir: Callable[[str], bool]) -> Iterator[tuple[str, list[str]]]:
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]
        yield dirpath, filenames


def glob_files(pattern: str) -> list[Path]:
    """Files matching ``pattern``; ``**`` (any depth) walks with :func:`walk_files` (loop-safe).

    Like :func:`glob.glob`, ``*`` and ``**`` don't match names that start with a dot.
    """
    parts = Path(pattern).parts
    if "**" not in parts:  # bounded depth: glob itself can't loop
        return sorted(Path(p) for p in glob.glob(pattern) if not os.path.isdir(p))
    n_lit = next(i for i, p in enumerate(parts) if glob.has_magic(p))
    root = Path(*parts[:n_lit]) if n_lit else Path(".")
    if not root.is_dir():
        return []
    rx = _pattern_regex(parts[n_lit:])
    hits = []
    for d, names in _walk(str(root), lambda name: name.startswith(".")):
        rel = os.path.relpath(d, root).replace(os.sep, "/")
        prefix = "" if rel == "." else rel + "/"
        hits.extend(Path(d, f) for f in names if rx.fullmatch(prefix + f))
    return sorted(hits)


def _pattern_regex(parts: tuple[str, ...]) -> re.Pattern:
    # glob semantics per component: * and ? stay inside it, ** spans any number of components, and
    # neither matches a leading dot (hidden names) unless the pattern's component starts with one
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(r"(?:(?!\.)[^/]+/)*(?!\.)[^/]+" if last else r"(?:(?!\.)[^/]+/)*")
            continue
        rx = "" if part.startswith(".") else r"(?!\.)"
        j = 0
        while j < len(part):
            c = part[j]
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif c == "[" and (k := part.find("]", j + 2)) != -1:  # a class: [abc], [!abc], []]
                body = part[j + 1:k].replace("\\", "\\\\")
                rx += "[^" + body[1:] + "]" if body.startswith("!") else "[" + body.replace("^", "\\^", 1) + "]"
                j = k
            else:
                rx += re.escape(c)
            j += 1
        out.append(rx + ("" if last else "/"))
    return re.compile("".join(out), re.DOTALL)


# -- reading and checking documents ----------------------------------------------------------
def digest_of(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def check_document(data: bytes, limits: Limits) -> tuple[str | None, str | None]:
    """``(reason, text)``: reason is None and text the decoded document, or why it is skipped."""
    if len(data) > limits.max_doc_bytes:
        return "too_large", None
    if b"\0" in data:
        return "binary", None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "non_utf8", None
    if not text.strip():
        return "empty", None
    if len(data) > limits.max_line_bytes and max(map(len, data.split(b"\n"))) > limits.max_line_bytes:
        return "long_line", None
    return None, text


def read_document(path: str | Path, limits: Limits) -> tuple[str | None, bytes, str | None]:
    """``(reason, digest, text)`` for one file; never blocks on a FIFO or a device."""
    try:
        st = os.stat(path)  # follows symlinks; a dangling one or a loop raises
        if not stat.S_ISREG(st.st_mode):
            return "unreadable", b"", None
        if st.st_size > limits.max_doc_bytes:
            return "too_large", b"", None
        with open(path, "rb") as fh:
            data = fh.read(limits.max_doc_bytes + 1)
    except OSError:
        return "unreadable", b"", None
    reason, text = check_document(data, limits)
    return reason, (digest_of(data) if reason is None else b""), text


def _jsonl_records(path: str, start: int, end: int, limits: Limits) -> Iterator[tuple[str | None, bytes, str | None, bool]]:
    # A line belongs to the range that holds its first byte; (reason, digest, text, indexed).
    try:
        fh = open(path, "rb")
    except OSError:
        if start == 0:
            yield "unreadable", b"", None, False
        return
    with fh:
        if start > 0:
            fh.seek(start - 1)
            fh.readline()  # the rest of the line that started in the previous range
        while fh.tell() < end:
            raw = fh.readline()
            if not raw:
                break
            if not raw.strip():
                continue
            try:
                text = json.loads(raw.decode("utf-8"))["text"]
            except (UnicodeDecodeError, ValueError, KeyError, TypeError):
                yield "bad_json", b"", None, False
                continue
            if not isinstance(text, str) or not text:
                yield "empty", b"", None, False
                continue
            data = text.encode("utf-8", errors="surrogatepass")
            reason, _ = check_document(data, limits)
            if reason == "empty":  # whitespace-only: counted as a record, as before
                yield None, digest_of(data), text, True
                continue
            yield reason, (digest_of(data) if reason is None else b""), (text if reason is None else None), True


# -- tasks -----------------------------------------------------------------------------------
def make_tasks(files: list[Path], sizes: list[int]) -> list[tuple]:
    """Cut the ordered file list into tasks: ``("files", [paths], bytes)`` or ``("jsonl", path, start, end)``."""
    tasks: list[tuple] = []
    group: list[str] = []
    group_bytes = 0
    for f, size in zip(files, sizes):
        if f.suffix == ".jsonl":
            if group:
                tasks.append(("files", group, group_bytes))
                group, group_bytes = [], 0
            tasks.extend(("jsonl", str(f), s, min(s + JSONL_TASK_BYTES, size))
                         for s in range(0, max(size, 1), JSONL_TASK_BYTES))
            continue
        group.append(str(f))
        group_bytes += max(size, 0)
        if group_bytes >= TASK_BYTES or len(group) >= TASK_FILES:
            tasks.append(("files", group, group_bytes))
            group, group_bytes = [], 0
    if group:
        tasks.append(("files", group, group_bytes))
    return tasks


def task_bytes(task: tuple) -> int:
    return task[2] if task[0] == "files" else task[3] - task[2]


# Per-worker state, set by _init_worker (or by run_tasks for the in-process path).
_W: dict = {}


def _init_worker(tok_state: tuple | None, limits: Limits, child: bool = True) -> None:
    if child:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core; no Rust pool in a child
    if child:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, once, quietly
    if child and sys.platform.startswith("linux"):
        try:  # die with the parent: a SIGKILLed build leaves no orphan workers
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except Exception:
            pass
    _W.clear()
    _W["limits"] = limits
    if tok_state is not None:
        tok = tokenizer_from_state(tok_state)
        _W.update(tok=tok, token_bytes=tok.token_bytes(),
                  dtype=np.uint16 if tok.vocab_size <= 2**16 else np.uint32)


def tokenizer_state(tok) -> tuple:
    """What a worker needs to rebuild ``tok``: small, picklable, no Rust object."""
    if tok.kind == "bytes":
        return ("bytes",)
    return (tok.kind, tok.tok.to_str(), tok.eos_id)


def tokenizer_from_state(state: tuple):
    from .tokenizer import ByteTokenizer, HFTokenizer

    if state[0] == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_str(state[1]), state[2], kind=state[0])


def _run_task(task: tuple) -> list[tuple]:
    """One task -> records ``(reason, digest, payload, n_bytes, indexed)``; ``payload`` is the token
    array (tokenising) or the text (sampling), None for a skipped document."""
    limits = _W["limits"]
    if task[0] == "files":
        docs = [(*read_document(p, limits), True) for p in task[1]]
    else:
        docs = list(_jsonl_records(task[1], task[2], task[3], limits))
    tok = _W.get("tok")
    if tok is None:  # sampling: texts only
        return [(r, d, t, len(t.encode("utf-8", errors="surrogatepass")) if t else 0, ix) for r, d, t, ix in docs]
    keep = [i for i, doc in enumerate(docs) if doc[0] is None]
    encoded = tok.encode_batch([docs[i][2] for i in keep]) if keep else []
    out: list[tuple] = [(r, d, None, 0, ix) for r, d, _, ix in docs]
    for i, ids in zip(keep, encoded):
        arr = np.empty(len(ids) + 1, dtype=_W["dtype"])
        arr[0] = tok.eos_id  # every document is preceded by EOS
        arr[1:] = ids
        out[i] = (None, docs[i][1], arr, int(_W["token_bytes"][arr].sum()), True)
    return out


def run_tasks(tasks: list[tuple], workers: int, tok_state: tuple | None, limits: Limits,
              on_task_done: Callable[[int], None] | None = None) -> Iterator[tuple[int, list[tuple]]]:
    """Yield ``(task_index, records)`` in task order, computed by ``workers`` processes.

    At most ``4 * workers`` tasks are outstanding, so the parent holds a bounded amount of
    results however slow the head task is. A worker's exception is re-raised here; closing the
    generator early (or an exception in the consumer) terminates the pool.
    """
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:  # in-process: same code, no pool
        saved = dict(_W)
        try:
            _init_worker(tok_state, limits, child=False)
            for i, task in enumerate(tasks):
                yield i, _run_task(task)
                if on_task_done:
                    on_task_done(i)
        finally:
            _W.clear()
            _W.update(saved)
        return
    import multiprocessing as mp

    method = os.environ.get("DELTANET_DATA_START_METHOD") or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    ctx = mp.get_context(method)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # inherited at fork: children never start a Rust pool
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tok_state, limits))
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        pending: collections.deque = collections.deque()
        nxt = 0
        while nxt < len(tasks) or pending:
            while nxt < len(tasks) and len(pending) < 4 * workers:
                pending.append(pool.apply_async(_run_task, (tasks[nxt],)))
                nxt += 1
            i = nxt - len(pending)
            yield i, pending.popleft().get()
            if on_task_done:
                on_task_done(i)
        pool.close()
        pool.join()
    finally:
        pool.terminate()

