"""Tokenising throughput: deltanet's cache build (1 worker, all cores) vs raw ``tokenizers`` encode_batch.

Same files, same tokenizer (a byte-level BPE trained on the corpus, or ``--tokenizer``):

* ``raw``: every usable file read into memory first (not timed), then ``Tokenizer.encode_batch``
  over ~2 MB batches (the Rust thread pool uses every core) - the library's ceiling for one process;
* ``ours-wN``: :func:`deltanet.training.data.build_token_cache` into a fresh cache directory with
  ``N`` worker processes, wall time end to end (listing, reading, checks, dedup, writing, pool start).

MB/s counts the corpus' file bytes (``raw``: the bytes it encoded). The caches built with different
worker counts are compared token for token (they must be identical). Results are written to
``OUT/tokenize.json`` and ``OUT/tokenize.md`` after every measurement.

    python benchmarks/bench_tokenize.py OUT                       # python-site, all of it
    python benchmarks/bench_tokenize.py OUT --max-mb 60           # a deterministic 60 MB subset
    python benchmarks/bench_tokenize.py OUT --data '/path/**/*.py' --workers 1,4,16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_info() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        info["usable_cores"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["mem_gb"] = round(int(open("/proc/meminfo").readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for mod in ("tokenizers", "numpy", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"unavailable ({e})"
    try:
        root = Path(__file__).resolve().parents[1]
        info["commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="directory for tokenize.json / tokenize.md")
    p.add_argument("--data", default="python-site", help="a deltanet data spec (default python-site)")
    p.add_argument("--tokenizer", default="bpe", help="'bpe' (trained here), or a tokenizer.json / run directory")
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--workers", default="1,all", help="comma list of worker counts; 'all' = every core")
    p.add_argument("--max-mb", type=float, default=0, help="use a deterministic subset of about this many MB (0: all)")
    p.add_argument("--budget-s", type=float, default=1800, help="skip measurements that start after this")
    args = p.parse_args()

    from deltanet.training.config import DataConfig
    from deltanet.training.data import Corpus, build_token_cache, open_corpus, prepare_tokenizer
    from deltanet.training.pipeline import default_workers, digest_of

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": machine_info(), "load_before": load(), "runs": [], "errors": []}

    def save() -> None:
        res["load_after"] = load()
        (out / "tokenize.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "tokenize.md").write_text(markdown(res))

    corpus = open_corpus(args.data)
    if args.max_mb:  # files in a fixed pseudo-random order (hash of the name) up to the size
        order = sorted(range(len(corpus.files)), key=lambda i: digest_of(corpus._relative(corpus.files[i]).encode()))
        keep, total = [], 0
        for i in order:
            if total >= args.max_mb * 1e6:
                break
            keep.append(i)
            total += max(0, corpus.sizes()[i])
        corpus = Corpus(corpus.spec, [corpus.files[i] for i in sorted(keep)], corpus.val_fraction,
                        split_by=corpus.split_by, roots=corpus.roots)
    res["corpus"] = {"spec": args.data, "files": len(corpus.files), "mb": round(corpus.approx_bytes() / 1e6, 2),
                     "file_list": corpus.list_fingerprint(), "subset_mb": args.max_mb or None}
    print(corpus.describe(), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    dc = DataConfig(data=args.data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, cache_dir=str(tmp))
    t0 = time.time()
    tok = prepare_tokenizer(dc, corpus, log=lambda m: print(m, flush=True))
    res["tokenizer"] = {"spec": args.tokenizer, "vocab_size": tok.vocab_size, "seconds": round(time.time() - t0, 1)}
    save()

    try:  # raw tokenizers: texts in memory, encode_batch over ~2 MB batches
        from deltanet.training.pipeline import read_document

        texts = [t for t in (read_document(f, corpus.limits)[2] for f in corpus.files) if t is not None]
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        batches, cur, size = [], [], 0
        for t in texts:
            cur.append(t)
            size += len(t)
            if size >= 2_000_000:
                batches.append(cur)
                cur, size = [], 0
        batches.append(cur)
        inner = getattr(tok, "tok", None)
        t0 = time.time()
        n_tok = 0
        for b in batches:
            if inner is not None:
                n_tok += sum(len(e.ids) for e in inner.encode_batch(b, add_special_tokens=False))
            else:
                n_tok += sum(map(len, tok.encode_batch(b)))
        dt = time.time() - t0
        res["runs"].append({"name": "raw tokenizers encode_batch", "workers": "rust threads", "seconds": round(dt, 2),
                            "mb": round(n_bytes / 1e6, 2), "mb_per_s": round(n_bytes / 1e6 / dt, 2), "tokens": n_tok,
                            "load": load()})
        del texts, batches
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"raw: {e!r}\n{traceback.format_exc()}")
    save()

    digests = {}
    for w in args.workers.split(","):
        n = default_workers() if w.strip() == "all" else int(w)
        if time.time() - t_start > args.budget_s:
            res["errors"].append(f"ours-w{n}: skipped, over the {args.budget_s:.0f}s budget")
            continue
        try:
            root = tmp / f"cache-w{n}"
            t0 = time.time()
            cache = build_token_cache(corpus, tok, root, progress=False, workers=n)
            dt = time.time() - t0
            m = cache.meta
            h = hashlib.sha256()
            for split in ("train", "val"):
                h.update(cache.tokens(split).tobytes())
            digests[n] = h.hexdigest()[:16]
            name = "deltanet build_token_cache, in-process" if n == 1 else f"deltanet build_token_cache, {n} processes"
            res["runs"].append({"name": name, "workers": n, "seconds": round(dt, 2),
                                "mb": round(corpus.approx_bytes() / 1e6, 2),
                                "mb_per_s": round(corpus.approx_bytes() / 1e6 / dt, 2),
                                "tokens": m["train_tokens"] + m["val_tokens"], "skipped": m["skipped"],
                                "token_sha": digests[n], "load": load()})
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"ours-w{n}: {e!r}\n{traceback.format_exc()}")
        save()
    res["identical_across_workers"] = len(set(digests.values())) <= 1 if digests else None
    res["total_s"] = round(time.time() - t_start, 1)
    save()
    print(markdown(res))
    return 0 if not res["errors"] else 1


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Tokenising throughput ({res['date']})", "", f"Command: `{res['command']}`", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('usable_cores', m.get('cores'))} usable cores, {m.get('mem_gb', '?')} GB; "
             f"{m.get('platform')}", f"Versions: Python {m['python']}, tokenizers {m['tokenizers']}, numpy {m['numpy']}, "
             f"torch {m['torch']}, deltanet commit {m.get('commit', '?')}",
             f"Load average (1/5/15 min) before: {res['load_before']}, after: {res.get('load_after')}", ""]
    c = res.get("corpus", {})
    if c:
        lines += [f"Corpus: `{c['spec']}`, {c['files']:,} files, {c['mb']} MB (file list {c['file_list']})"
                  + (f", subset of ~{c['subset_mb']} MB" if c.get("subset_mb") else ""), ""]
    t = res.get("tokenizer")
    if t:
        lines += [f"Tokenizer: {t['spec']} ({t['vocab_size']} tokens; obtained in {t['seconds']}s)", ""]
    raw = next((r for r in res["runs"] if r["name"].startswith("raw")), None)
    lines += ["| what | workers | seconds | MB | MB/s | vs raw | tokens |", "|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ratio = f"{r['mb_per_s'] / raw['mb_per_s']:.2f}x" if raw else "-"
        lines.append(f"| {r['name']} | {r['workers']} | {r['seconds']} | {r['mb']} | {r['mb_per_s']} | {ratio} | {r['tokens']:,} |")
    lines += ["", "MB/s counts file bytes. `raw`: texts already in memory, `Tokenizer.encode_batch` with its own "
              "thread pool (all cores). `in-process` (1 worker): the same pipeline in one process, whose "
              "`encode_batch` also uses the tokenizer's threads; N processes: one single-threaded tokenizer each. "
              "Ours is end to end: listing, reading, checks, hashing, dedup, writing the cache, starting the pool."]
    if "identical_across_workers" in res:
        lines += ["", f"Token ids identical across worker counts: {res['identical_across_workers']}"]
    for e in res["errors"]:
        lines += ["", "Error: " + e.splitlines()[0]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
