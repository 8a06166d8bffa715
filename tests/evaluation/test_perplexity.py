"""The recall split of ``deltanet eval ppl``: the hit mask and the split sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltanet.evaluation.perplexity import evaluate, evaluate_rows, recall_hit_mask

EOS = 0


def naive_hits(row: list[int], eos: int) -> list[bool]:
    """Zoology's definition, one token at a time: the bigram ending at i seen earlier in this document."""
    out, seen = [False], set()
    for i in range(1, len(row)):
        if row[i - 1] == eos:  # EOS opens a document
            seen = set()
        big = (row[i - 1], row[i])
        out.append(big in seen)
        seen.add(big)
    return out


def test_hand_made_row():
    #        0  1  2  3  4  5  6  7  8  9 10 11
    row = [[7, 3, 4, 3, 4, 0, 3, 4, 9, 3, 4, 3]]
    hit = recall_hit_mask(np.array(row), EOS)[0].tolist()
    # (3,4) at 2 is new, at 4 a hit; the EOS at 5 opens a new document: (3,4) at 7 is new again
    # and a hit at 10; (4,3) at 11 occurred only in the first document (at 3): not a hit
    assert hit == [False, False, False, False, True, False, False, False, False, False, True, False]


def test_earlier_documents_and_rows_do_not_count():
    rows = np.array([[0, 5, 6, 5, 6, 0, 5, 6],
                     [5, 6, 1, 5, 6, 0, 0, 0]])
    hit = recall_hit_mask(rows, EOS)
    # row 0: the second document repeats (5,6) of the first: not a hit there
    assert hit[0].tolist() == [False, False, False, False, True, False, False, False]
    # row 1 starts mid-document: (5,6) of row 0 doesn't count; its own repeat at 4 does;
    # (0,0) at 7: a new document opened by the EOS at 6, so not a hit either
    assert hit[1].tolist() == [False, False, False, False, True, False, False, False]


def test_matches_the_token_by_token_definition():
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.integers(0, 5, size=(3, 40))  # small vocab: many repeats, many EOS (0)
        got = recall_hit_mask(rows, EOS)
        want = np.array([naive_hits(r.tolist(), EOS) for r in rows])
        np.testing.assert_array_equal(got, want)
        assert got.any() and not got.all()


def test_bad_shape():
    with pytest.raises(ValueError, match=r"rows must be \[B, T\]"):
        recall_hit_mask(np.zeros(5, dtype=np.int64), EOS)


class _Bytes:
    eos_id = EOS

    def token_bytes(self):
        out = np.ones(16, dtype=np.int64)
        out[EOS] = 0
        return out


def _tiny_model():
    from deltanet.models import DeltaNetForCausalLM, get_config

    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=16, hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64)
    return DeltaNetForCausalLM(cfg).eval()


@pytest.mark.parametrize("doc_mask", [True, False])
def test_split_sums_add_up_to_the_total(doc_mask):
    model = _tiny_model()
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 6, size=4 * 24).astype(np.uint16)
    res = evaluate(model, _Bytes(), tokens, seq_len=24, batch_size=2, doc_mask=doc_mask, recall_split=True)
    hit, other = res["recall"]["hit"], res["recall"]["other"]
    assert hit["tokens"] > 0 and other["tokens"] > 0
    assert hit["tokens"] + other["tokens"] == res["tokens"] == 4 * 23
    assert hit["bytes"] + other["bytes"] == res["bytes"]
    # the total loss is the token-weighted mean of the two parts
    mean = (hit["loss"] * hit["tokens"] + other["loss"] * other["tokens"]) / res["tokens"]
    assert res["loss"] == pytest.approx(mean, rel=1e-6)  # float32 vs float64 sums
    assert res["recall"]["hit_fraction"] == pytest.approx(hit["tokens"] / res["tokens"])
    # the hit count is the mask's count over the evaluated targets (positions 1..T-1)
    rows = tokens.astype(np.int64).reshape(4, 24)
    assert hit["tokens"] == int(recall_hit_mask(rows, EOS)[:, 1:].sum())
    # same numbers as the plain evaluation
    plain = evaluate(model, _Bytes(), tokens, seq_len=24, batch_size=2, doc_mask=doc_mask)
    assert plain["loss"] == pytest.approx(res["loss"], rel=1e-12) and "recall" not in plain


def test_hit_loss_is_the_loss_of_the_hit_tokens():
    """Per-token NLL by hand, averaged over the mask, against the reported hit loss."""
    model = _tiny_model()
    rows = np.array([[0, 3, 4, 3, 4, 5, 3, 4, 0, 3, 4, 3]])
    res = evaluate(model, _Bytes(), rows.reshape(-1).astype(np.uint16), seq_len=12, recall_split=True)
    out = evaluate_rows(model, [rows], eos_id=EOS, token_bytes=_Bytes().token_bytes(), device="cpu",
                        recall_split=True)
    assert out.shape == (3, 3)
    from deltanet.training.data import make_batch

    b = make_batch(rows, EOS)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], cu_seqlens=b["cu_seqlens"], use_cache=False).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1].double(), torch.as_tensor(rows[0, 1:]), reduction="none")
    mask = torch.as_tensor(recall_hit_mask(rows, EOS)[0, 1:])
    assert mask.sum() == 2  # positions 4 and 7; (4,3) at 11 is in the second document
    assert res["recall"]["hit"]["loss"] == pytest.approx(float(nll[mask].mean()), rel=1e-5)
    assert res["recall"]["other"]["loss"] == pytest.approx(float(nll[~mask].mean()), rel=1e-5)
