"""Corpus splitting, token cache, packing and document masking."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deltanet.training.data import (DataError, PackedTokens, build_token_cache, make_batch, open_corpus,
                                    stdlib_files)
from deltanet.training.tokenizer import ByteTokenizer


def test_split_by_file_is_deterministic_and_disjoint(tmp_path):
    for i in range(10):
        (tmp_path / f"{i}.txt").write_text(f"file {i}\n")
    c = open_corpus(str(tmp_path), val_fraction=0.2)
    train, val = list(c.iter_texts("train")), list(c.iter_texts("val"))
    assert val == ["file 4\n", "file 9\n"]  # every 5th file, sorted order
    assert len(train) == 8 and not set(train) & set(val)
    assert list(open_corpus(str(tmp_path), 0.2).iter_texts("train")) == train


def test_glob_jsonl_and_single_file(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(4))
                                      + "\nnot json\n" + json.dumps({"other": 1}) + "\n")
    c = open_corpus(str(tmp_path / "*.jsonl"), val_fraction=0.5)
    assert list(c.iter_texts("train")) == ["doc 0", "doc 2"]
    assert list(c.iter_texts("val")) == ["doc 1", "doc 3"]
    assert c.skipped["bad_json"] == 2
    single = tmp_path / "one.txt"
    single.write_text("".join(f"line {i}\n" for i in range(10)))
    c = open_corpus(str(single), val_fraction=0.2)
    assert list(c.iter_texts("val")) == ["line 8\nline 9\n"]
    assert list(c.iter_texts("train"))[0].endswith("line 7\n")


def test_non_utf8_skipped_and_counted(tmp_path):
    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "bad.py").write_bytes(b"\xff\xfe latin-1 \xe9\n")
    (tmp_path / "empty.py").write_text("  \n")
    c = open_corpus(str(tmp_path), val_fraction=0.5)
    texts = list(c.iter_texts("train")) + list(c.iter_texts("val"))
    assert texts == ["x = 1\n"]
    assert c.skipped["non_utf8"] == 1 and c.skipped["empty"] == 1


@pytest.mark.parametrize("spec", ["/no/such/path", "/no/such/*.txt"], ids=["path", "glob"])
def test_missing_data_is_a_data_error(spec):
    with pytest.raises(DataError, match="not found|no files match"):
        open_corpus(spec)


def test_stdlib_corpus_is_sorted_python():
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert not any("test" in f.parts for f in files)  # the test suites are left out by default
    with_tests = open_corpus("stdlib-all").files
    assert set(files) < set(with_tests) and any("test" in f.parts for f in with_tests)


def test_token_cache_roundtrip_and_reuse(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"{i}.txt").write_text(f"héllo {i}")
    tok = ByteTokenizer()
    c = open_corpus(str(data), val_fraction=0.5)
    cache = build_token_cache(c, tok, tmp_path / "cache", progress=False)
    train = cache.tokens("train").tolist()
    assert train == [256, *"héllo 0".encode(), 256, *"héllo 2".encode()]
    assert cache.meta["train_bytes"] == 2 * len("héllo 0".encode()) and cache.meta["dtype"] == "uint16"
    again = build_token_cache(open_corpus(str(data), 0.5), tok, tmp_path / "cache", progress=False)
    assert again.path == cache.path  # reused, not rebuilt
    (data / "0.txt").write_text("changed")
    changed = build_token_cache(open_corpus(str(data), 0.5), tok, tmp_path / "cache", progress=False)
    assert changed.path != cache.path and changed.tokens("train")[1:8].tobytes() == np.frombuffer(b"changed", np.uint8).astype(np.uint16).tobytes()


def test_packed_rows_deterministic_epochs():
    tokens = np.arange(40, dtype=np.uint16)
    p = PackedTokens(tokens, seq_len=4, seed=3)
    first = p.rows(np.arange(10))
    assert sorted(first[:, 0].tolist()) == list(range(0, 40, 4))  # one epoch = every row once
    assert (PackedTokens(tokens, 4, seed=3).rows(np.arange(10, 20)) != first).any()  # next epoch reshuffled
    np.testing.assert_array_equal(PackedTokens(tokens, 4, seed=3).rows(np.arange(5, 8)), first[5:8])


def test_make_batch_boundaries():
    rows = np.array([[9, 9, 0, 9], [0, 9, 9, 9], [9, 0, 9, 0]])
    b = make_batch(rows, eos_id=0)
    assert b["input_ids"].shape == (1, 12)
    assert b["cu_seqlens"].tolist() == [0, 2, 4, 8, 9, 11, 12]
    assert (b["labels"].view(3, 4)[:, 0] == -100).all()
    plain = make_batch(rows, eos_id=0, doc_mask=False)
    assert plain["input_ids"].shape == (3, 4) and (plain["labels"][:, 1:] == plain["input_ids"][:, 1:]).all()


def test_packed_documents_do_not_see_each_other():
    """The loss on document B in a packed row equals its loss when the row holds B alone."""
    from deltanet.models import DeltaNetForCausalLM, get_config

    torch.manual_seed(0)
    model = DeltaNetForCausalLM(get_config("tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                           num_heads=2, intermediate_size=64)).eval()
    a, b = [5, 6, 7, 8, 9, 10], [11, 12, 13, 14]
    packed = make_batch(np.array([[0, *a, 0, *b]]), eos_id=0)
    alone = make_batch(np.array([[0, *b]]), eos_id=0)
    with torch.no_grad():
        lp = model(**packed, use_cache=False).logits[0, -5:]
        la = model(**alone, use_cache=False).logits[0]
    torch.testing.assert_close(lp, la, atol=1e-5, rtol=1e-5)


def test_hf_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(6)]}).save_to_disk(str(tmp_path / "ds"))
    c = open_corpus(f"hf:{tmp_path / 'ds'}", val_fraction=0.5)
    assert list(c.iter_texts("train")) == ["row 0", "row 2", "row 4"]
    assert list(c.iter_texts("val")) == ["row 1", "row 3", "row 5"]


def test_hf_datasets_without_the_package_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install 'deltanet\[datasets\]'"):
        open_corpus("hf:wikitext:wikitext-2-raw-v1")
