"""Golden loss sequences: ``deltanet train`` and an MQAR sweep train exactly as they did before
both were moved onto one training core (``deltanet.training.core``).

The expected numbers were recorded on 2026-12-06 with the code at commit e93a914 (before the
move), CPU (x86-64, torch 2.13), one thread; 2 threads gave the same digits. The trainer's warm-up
learning rate is now ``peak * ((step + 1) / warmup)`` rather than ``peak * (step + 1) / warmup``
(at most one ulp apart: at step 3 of 3 it is now exactly 3e-3, it was 0.0030000000000000005); the
losses and gradient norms still came out bit for bit. The comparison allows 1e-6 relative so that
another CPU's vector kernels do not fail it.

The numbers were recorded with the plain loss (full logits, ``F.cross_entropy``). ``deltanet train``
now computes the loss by default as the fused linear cross-entropy, which sums the same terms in
another order: on the machine above its losses and gradient norms came within 2.7e-7 relative of
the recorded ones over the 6 steps (validation, which always takes the plain path, bit for bit).
Both paths are checked against the same numbers.
"""

from __future__ import annotations

import json

import pytest
import torch

from ._helpers import make_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

# step -> (loss, grad_norm, lr) of the run configured in test_train_losses_match_the_recorded_run
TRAIN_GOLDEN = {
    1: (5.773475646972656, 3.6700282096862793, 0.001),
    2: (5.6488189697265625, 3.193269729614258, 0.002),
    3: (5.487269401550293, 3.096968173980713, 0.0030000000000000005),
    4: (5.2140421867370605, 3.2184665203094482, 0.003),
    5: (4.999557018280029, 2.8341431617736816, 0.0023250000000000002),
    6: (4.830585479736328, 2.6616392135620117, 0.0009750000000000004),
}
TRAIN_GOLDEN_VAL_LOSS = 4.8768512356665825

# (model, lr) -> per-step training loss (eval_every=1) and held-out accuracy
MQAR_GOLDEN = {
    ("delta_net", 3e-3): (
        [4.144753456115723, 4.150111675262451, 4.165848731994629, 4.159394264221191, 4.160240650177002,
         4.162718772888184, 3.9615893363952637, 3.975679397583008],
        [0.0, 0.015625, 0.0390625, 0.0390625, 0.015625, 0.0, 0.0, 0.0]),
    ("delta_net", 1e-2): (
        [4.144753456115723, 4.144782066345215, 4.146799087524414, 4.189188003540039, 4.115584850311279,
         3.9347572326660156, 3.68523907661438, 3.736027717590332],
        [0.0078125, 0.0078125, 0.0234375, 0.046875, 0.0546875, 0.0234375, 0.0234375, 0.015625]),
    ("hybrid-swa", 3e-3): (
        [4.144162178039551, 4.167114734649658, 4.148361682891846, 4.140076637268066, 4.148735523223877,
         4.159229278564453, 3.9707937240600586, 3.9586191177368164],
        [0.046875, 0.046875, 0.0546875, 0.0546875, 0.046875, 0.0390625, 0.0390625, 0.0390625]),
    ("hybrid-swa", 1e-2): (
        [4.144162178039551, 4.16607666015625, 4.156635284423828, 4.154315948486328, 4.13240385055542,
         3.9889583587646484, 3.7164599895477295, 3.747948169708252],
        [0.0390625, 0.015625, 0.015625, 0.0234375, 0.0234375, 0.0, 0.0, 0.0]),
}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-loss", "plain-loss"])
def test_train_losses_match_the_recorded_run(tmp_path, fused):
    """Tiny preset, 2 micro-batches per step (accumulation), warm-up then cosine, clipping at 1."""
    from deltanet.training.config import RunConfig
    from deltanet.training.trainer import train

    corpus = make_corpus(tmp_path / "corpus")
    cfg = RunConfig.from_dict({
        "data": str(corpus), "tokenizer": "bytes", "seq_len": 32, "cache_dir": str(tmp_path / "cache"),
        "batch_size": 4, "grad_accum": 2, "max_steps": 6, "warmup": 3, "lr": 3e-3,
        "eval_every": 100, "eval_batches": 2, "log_every": 1, "sample_tokens": 0, "progress": False,
        "threads": 1, "out": str(tmp_path / "run"),
        "model": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 2, "intermediate_size": 128,
                  "fuse_linear_cross_entropy": fused}})
    train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in recs}
    assert sorted(got) == sorted(TRAIN_GOLDEN)
    for step, want in TRAIN_GOLDEN.items():
        assert got[step] == pytest.approx(want, rel=1e-6, abs=0), step
    assert recs[-1]["val_loss"] == pytest.approx(TRAIN_GOLDEN_VAL_LOSS, rel=1e-6, abs=0)


def test_mqar_sweep_losses_match_the_recorded_run():
    """Two models x two learning rates, warm-up 3 then cosine to 0, AdamW (0.9, 0.98), clipping at 1."""
    from deltanet.evaluation.tasks.mqar import SweepConfig, run_sweep
    from deltanet.evaluation.tasks.synthetic import TrainConfig

    sweep = SweepConfig(models=["delta_net", "hybrid-swa"], widths=[32], settings=[(32, 4)], lrs=[3e-3, 1e-2],
                        vocab_size=64, num_layers=2, head_dim=16, sliding_window=8, train_size=96, test_size=32)
    train = TrainConfig(epochs=10, max_steps=8, batch_size=16, eval_every=1, eval_batch_size=32, warmup_steps=3,
                        device="cpu")
    results = run_sweep(sweep, train, progress=False)
    got = {(r["model"], r["lr"]): ([c["loss"] for c in r["curve"]], [c["accuracy"] for c in r["curve"]])
           for r in results}
    assert sorted(got) == sorted(MQAR_GOLDEN)
    for key, (want_loss, want_acc) in MQAR_GOLDEN.items():
        assert got[key][0] == pytest.approx(want_loss, rel=1e-6, abs=0), key
        assert got[key][1] == want_acc, key
