"""The parallel tokenising pipeline: same ids as one worker, duplicates, hostile files, interrupted
builds, python-site, and `deltanet data prepare` feeding `deltanet train`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltanet.training import pipeline
from deltanet.training.data import Corpus, build_token_cache, open_corpus, tokenizer_sample
from deltanet.training.pipeline import Limits, digest_of
from deltanet.training.tokenizer import ByteTokenizer, train_bpe

from ._helpers import make_corpus, run_cli

EOS = ByteTokenizer.eos_id


@pytest.fixture
def no_hang():
    # a FIFO opened for reading, or a symlink loop walked forever, would block: fail instead
    def boom(*_):
        raise TimeoutError("pipeline hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _varied_corpus(root: Path, n: int = 30) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        body = "".join(f"def g{i}_{j}(a, b):\n    return a ** {j} - b  # ünï {i * j}\n" for j in range(i % 7 + 1))
        (root / f"{i:03d}.py").write_text(body)
    (root / "dup_a.py").write_text((root / "004.py").read_text())  # an exact duplicate, later in the order
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "dup_b.py").write_text((root / "004.py").read_text())
    return root


def _tokens(cache) -> dict[str, list[int]]:
    return {s: cache.tokens(s).tolist() for s in ("train", "val")}


def _byte_docs(cache, split: str) -> list[str]:
    ids = cache.tokens(split).tolist()
    starts = [i for i, t in enumerate(ids) if t == EOS] + [len(ids)]
    return [bytes(ids[a + 1:b]).decode() for a, b in zip(starts, starts[1:])]


def _strip(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "build"}


@pytest.mark.parametrize("split_by", ["index", "hash"])
def test_parallel_ids_equal_serial(tmp_path, monkeypatch, split_by):
    monkeypatch.setattr(pipeline, "TASK_FILES", 3)  # many small tasks: ordering across workers matters
    data = _varied_corpus(tmp_path / "data")
    texts = [p.read_text() for p in sorted(data.rglob("*.py"))]
    tok = train_bpe(iter(texts * 3), vocab_size=300)

    def corpus():
        c = open_corpus(str(data), val_fraction=0.2)
        c.split_by = split_by
        return c

    serial = build_token_cache(corpus(), tok, tmp_path / "c1", progress=False, workers=1)
    par = build_token_cache(corpus(), tok, tmp_path / "c2", progress=False, workers=2)
    assert _tokens(par) == _tokens(serial) and _strip(par.meta) == _strip(serial.meta)
    assert par.meta["build"]["workers"] == 2 and serial.meta["build"]["workers"] == 1
    # and both equal the definition: EOS + encode(doc) for the first copy of each document, in file order
    c = corpus()
    seen, want = set(), {"train": [], "val": []}
    for j, f in enumerate(c.files):
        text = f.read_text()
        if text not in seen:
            seen.add(text)
            want["val" if c.is_val(j, digest_of(text.encode())) else "train"] += [tok.eos_id, *tok.encode_batch([text])[0]]
    assert _tokens(serial) == want and want["val"]
    assert serial.meta["skipped"]["duplicate"] == 2


def test_spawned_workers_give_the_same_ids(tmp_path, monkeypatch):
    # no state inherited from the parent: the tokenizer travels as its JSON
    data = make_corpus(tmp_path / "data", n_files=6)
    tok = train_bpe(iter([p.read_text() for p in sorted(data.iterdir())]), vocab_size=300)
    ref = build_token_cache(open_corpus(str(data)), tok, tmp_path / "c1", progress=False, workers=1)
    monkeypatch.setenv("DELTANET_DATA_START_METHOD", "spawn")
    monkeypatch.setattr(pipeline, "TASK_FILES", 2)
    got = build_token_cache(open_corpus(str(data)), tok, tmp_path / "c2", progress=False, workers=2)
    assert _tokens(got) == _tokens(ref)


def test_duplicates_dropped_first_copy_kept(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, text in [("a.txt", "same"), ("b.txt", "other"), ("c.txt", "same"), ("d.txt", "same"), ("e.txt", "x")]:
        (data / name).write_text(text)
    c = open_corpus(str(data), val_fraction=0.5)  # every 2nd file is val: b, d
    cache = build_token_cache(c, ByteTokenizer(), tmp_path / "cache", progress=False, workers=2)
    assert cache.tokens("train").tolist() == [EOS, *b"same", EOS, *b"x"]  # c.txt: a duplicate of a.txt
    assert cache.tokens("val").tolist() == [EOS, *b"other"]  # d.txt too
    assert cache.meta["skipped"]["duplicate"] == 2 and cache.meta["train_docs"] == 2


def test_hostile_files_skipped_and_counted(tmp_path, no_hang):
    data = tmp_path / "data"
    (data / "pkg").mkdir(parents=True)
    (data / "good.py").write_text("x = 1\n")
    (data / "pkg" / "good2.py").write_text("y = 2\n")
    (data / "one_line.py").write_bytes(b"s = '" + b"ab" * 1_500_000 + b"'")  # a 3 MB single line
    (data / "big.py").write_bytes(b"z = 0\n" * 800_000)  # 4.8 MB: over the test's max_doc_bytes
    (data / "nul.py").write_bytes(b"x = 1\n\x00\x01\x02binary")
    (data / "latin1.py").write_bytes(b"# caf\xe9\n")
    (data / "empty.py").write_bytes(b"")
    (data / "blank.py").write_text("\n  \n")
    (data / "pkg" / "loop").symlink_to(data)  # a symlink loop: pkg/loop/pkg/loop/...
    (data / "dangling.py").symlink_to(tmp_path / "nowhere")  # cannot be opened
    os.mkfifo(data / "fifo.py")  # opening it for reading would block forever
    for spec in (str(data), str(data / "**" / "*.py")):
        c = open_corpus(spec, val_fraction=0.5)
        c.limits = Limits(max_doc_bytes=4_000_000, max_line_bytes=10_000)
        assert sum("loop" in f.parts for f in c.files) <= len(list(data.rglob("*"))), "the loop was walked"
        cache = build_token_cache(c, ByteTokenizer(), tmp_path / "cache", progress=False, workers=2)
        assert sorted(_byte_docs(cache, "train") + _byte_docs(cache, "val")) == ["x = 1\n", "y = 2\n"]
        sk = cache.meta["skipped"]
        assert (sk["long_line"], sk["too_large"], sk["binary"], sk["non_utf8"]) == (1, 1, 1, 1), sk
        assert sk["empty"] == 2 and sk["unreadable"] == 2, sk  # dangling symlink, FIFO
        # files seen again through the loop (pkg/loop/good.py ...) are exact duplicates at most
        assert sk["duplicate"] == sum(1 for f in c.files if "loop" in f.parts and f.name.startswith("good"))


def test_multi_mb_line_with_default_limits(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("a = 1\n")
    (data / "b.py").write_text("b = [" + "1," * 1_000_000 + "]\n")  # 2 MB on one line
    cache = build_token_cache(open_corpus(str(data), 0.5), ByteTokenizer(), tmp_path / "c", progress=False, workers=2)
    assert cache.meta["skipped"]["long_line"] == 1 and cache.meta["train_docs"] + cache.meta["val_docs"] == 1


def test_worker_failure_leaves_no_cache_and_rebuild_matches(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "TASK_FILES", 2)
    data = make_corpus(tmp_path / "data", n_files=12)
    tok = ByteTokenizer()
    read = pipeline.read_document
    monkeypatch.delenv("DELTANET_DATA_START_METHOD", raising=False)  # forked workers inherit the patch below

    def failing(path, limits):  # forked workers inherit the patch
        if Path(path).name == "m07.py":
            raise RuntimeError("injected failure reading m07.py")
        return read(path, limits)

    monkeypatch.setattr(pipeline, "read_document", failing)
    with pytest.raises(RuntimeError, match="injected failure reading m07.py"):
        build_token_cache(open_corpus(str(data)), tok, tmp_path / "cache", progress=False, workers=2)
    assert list((tmp_path / "cache").iterdir()) == []  # no final cache, no temp directory
    monkeypatch.setattr(pipeline, "read_document", read)
    again = build_token_cache(open_corpus(str(data)), tok, tmp_path / "cache", progress=False, workers=2)
    ref = build_token_cache(open_corpus(str(data)), tok, tmp_path / "ref", progress=False, workers=1)
    assert not again.reused and _tokens(again) == _tokens(ref)


_KILL_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job may start with SIGINT ignored
from deltanet.training.data import build_token_cache, open_corpus
from deltanet.training.tokenizer import ByteTokenizer
build_token_cache(open_corpus(sys.argv[1]), ByteTokenizer(), sys.argv[2], progress=False, workers=2)
"""


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(x) for x in (task / "children").read_text().split()}
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_interrupted_build_leaves_nothing_half_written(tmp_path, sig):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(400):  # ~48 MB of bytes-tokenised text: a few seconds of work
        (data / f"{i:03d}.txt").write_text(f"{i} " + "lorem ipsum dolor sit amet\n" * 4_500)
    cache_root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_CHILD, str(data), str(cache_root)], stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline:  # wait until the build is writing tokens
        tmp = list(cache_root.glob(".tmp-*/train.bin")) if cache_root.is_dir() else []
        if tmp and tmp[0].stat().st_size > 1_000_000:
            workers = _children(proc.pid)
            break
        assert proc.poll() is None, "the build finished before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert workers, "no worker processes seen"
    assert not [d for d in cache_root.iterdir() if not d.name.startswith(".tmp-")]  # no final cache
    # SIGKILL leaves the temp dir (removed by the next build); Ctrl-C removes it on the way out
    assert len([d for d in cache_root.iterdir() if d.name.startswith(".tmp-")]) == (sig == signal.SIGKILL)
    for _ in range(100):  # the workers die with their parent
        if not any(Path(f"/proc/{w}").exists() and "zombie" not in Path(f"/proc/{w}/status").read_text()
                   for w in workers):
            break
        time.sleep(0.05)
    else:
        pytest.fail("worker processes outlived the killed build")
    rebuilt = build_token_cache(open_corpus(str(data)), ByteTokenizer(), cache_root, progress=False, workers=2)
    assert [d.name for d in cache_root.iterdir()] == [rebuilt.path.name]  # the stale temp dir is gone
    ref = build_token_cache(open_corpus(str(data)), ByteTokenizer(), tmp_path / "ref", progress=False, workers=1)
    assert _tokens(rebuilt) == _tokens(ref)


def test_hash_split_is_stable_when_files_are_added(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(200):
        (data / f"{i:03d}.py").write_text(f"v = {i}\n")

    def val_texts():
        c = Corpus("x", sorted(data.iterdir()), val_fraction=0.1, split_by="hash")
        return set(c.iter_texts("val")), set(c.iter_texts("train"))

    val, train = val_texts()
    assert 5 <= len(val) <= 40 and not val & train  # about 10%
    for i in range(200, 260):
        (data / f"{i:03d}.py").write_text(f"v = {i}\n")
    (data / "000_first.py").write_text("new = 1\n")  # sorts before everything: indices shift
    val2, train2 = val_texts()
    assert val <= val2 and train <= train2


def test_python_site_corpus():
    import numpy

    c = open_corpus("python-site")
    assert c.split_by == "hash" and [label for label, _ in c.roots][0] == "stdlib"
    names = {str(f) for f in c.files}
    assert os.path.join(os.path.dirname(os.__file__), "os.py") in names  # the stdlib
    assert str(Path(numpy.__file__)) in names  # site-packages
    assert all(f.suffix == ".py" and "__pycache__" not in f.parts for f in c.files)
    assert any("test" in f.parts for f in c.files)  # the stdlib's tests too
    assert len(names) == len(c.files)  # each file once
    assert c.list_fingerprint() == open_corpus("python-site").list_fingerprint()
    assert "file list fingerprint " + c.list_fingerprint() in c.describe()


def test_tokenizer_sample_is_bounded_train_only_and_worker_independent(tmp_path):
    data = _varied_corpus(tmp_path / "data", n=60)
    (data / "dup_a.py").unlink()  # a duplicate may sit in both splits; here every text is unique
    (data / "sub" / "dup_b.py").unlink()
    c = open_corpus(str(data), val_fraction=0.2)
    one = tokenizer_sample(c, max_bytes=2_000, workers=1)
    two = tokenizer_sample(c, max_bytes=2_000, workers=2)
    assert one == two and 2_000 <= sum(len(t.encode()) for t in one) < 2_000 + max(len(t.encode()) for t in one)
    assert not set(one) & set(c.iter_texts("val")) and len(set(one)) == len(one)


def test_data_prepare_then_train_reuses_the_cache(tmp_path):
    data = make_corpus(tmp_path / "data", n_files=8)
    cache = tmp_path / "cache"
    flags = ["--data", str(data), "--cache-dir", str(cache), "--vocab-size", "300", "--data-workers", "2"]
    prep = run_cli(["data", "prepare", *flags, "--no-progress"])
    assert prep.returncode == 0, prep.stderr
    assert "token cache built" in prep.stdout and "8 files" in prep.stdout and "file list fingerprint" in prep.stderr
    assert "with 2 workers into" in prep.stderr and "BPE tokenizer" in prep.stderr
    built = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    from ._helpers import TINY_MODEL

    train = run_cli(["train", *flags, "--out", str(tmp_path / "run"), "--seq-len", "32", "--batch-size", "2",
                     "--max-steps", "2", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", *TINY_MODEL])
    assert train.returncode == 0, train.stderr
    assert "token cache reused" in train.stderr and "BPE tokenizer: reused" in train.stderr
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == built  # nothing rebuilt
    meta = json.loads(next(p for p in cache.iterdir() if p.name != "tokenizers").joinpath("meta.json").read_text())
    assert meta["files"] == 8 and meta["build"]["workers"] == 2


def test_data_command_needs_prepare(capsys):
    from deltanet.cli import main

    assert main(["data"]) == 2 and "deltanet data prepare" in capsys.readouterr().err


def test_digest_split_uses_content():
    c = Corpus("x", [], val_fraction=0.5, split_by="hash")
    d = digest_of(b"abc")
    assert c.is_val(0, d) == c.is_val(99, d)  # position plays no part


def test_jsonl_split_into_byte_ranges_keeps_every_record_once(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "JSONL_TASK_BYTES", 37)  # ranges end mid-line
    lines = []
    for i in range(60):
        lines.append(json.dumps({"text": f"record {i} " + "é" * (i % 5)}))
        if i % 13 == 0:
            lines += ["not json", "", json.dumps({"text": ""})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "record 3 ééé"}) + "\n")  # a duplicate
    c = open_corpus(str(tmp_path / "*.jsonl"), val_fraction=0.2)
    assert len(pipeline.make_tasks(c.files, c.sizes())) > 20
    cache = build_token_cache(c, ByteTokenizer(), tmp_path / "cache", progress=False, workers=2)
    want = open_corpus(str(tmp_path / "*.jsonl"), val_fraction=0.2)
    train = list(want.iter_texts("train"))
    assert train[-1] == train[3] == "record 3 ééé"  # b.jsonl's copy comes last: the one dropped
    assert _byte_docs(cache, "train") == train[:-1]
    assert _byte_docs(cache, "val") == list(want.iter_texts("val"))
    sk = cache.meta["skipped"]
    assert (sk["bad_json"], sk["empty"], sk["duplicate"]) == (5, 5, 1)
