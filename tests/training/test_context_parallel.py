"""``deltanet train --context-parallel 2`` under torchrun (2 gloo processes, one context-parallel
group, so both see the same rows) trains exactly as one process: the same loss at every step
(later steps follow from the gradients, so the gradients match too), for DeltaNet and for the
sliding-window and global-attention hybrids on plain rows, and with packed documents (the
default doc mask; 3 rows of 32 tokens packed into one of 96, split at 48, so a row and its
documents span both ranks) for the sliding-window hybrid under activation checkpointing and for
linear attention."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deltanet.cli.train import build_train_config
from deltanet.training.config import ConfigError

from ._helpers import env_1thread, losses, make_corpus, run_cli, train_args


# The hybrids with the tiny model's 2 layers: [delta_net, sliding_attention] with a window of 6
# (shorter than the 16-token segments) and [delta_net, full_attention].
SWA = ["--preset", "hybrid-swa-125m", "--model", "sliding_window=6"]
PACKED = ["--batch-size", "3"]  # 96 packed tokens: the second row crosses the rank edge at 48
MODELS = {"deltanet": ["--no-doc-mask"], "hybrid-swa": ["--no-doc-mask", *SWA],
          "hybrid-global": ["--no-doc-mask", "--preset", "hybrid-global-125m"],
          "packed-hybrid-swa-checkpointing": [*PACKED, *SWA, "--activation-checkpointing", "block"],
          "packed-linear-attention": [*PACKED, "--preset", "linear-attn-125m"]}
LAYER_TYPES = {"deltanet": ["delta_net"] * 2, "hybrid-swa": ["delta_net", "sliding_attention"],
               "hybrid-global": ["delta_net", "full_attention"],
               "packed-hybrid-swa-checkpointing": ["delta_net", "sliding_attention"],
               "packed-linear-attention": ["linear_attention"] * 2}


@pytest.mark.parametrize("model", list(MODELS))
def test_context_parallel_two_processes_match_one(tmp_path, model):
    corpus = make_corpus(tmp_path / "corpus", n_files=4)
    one = train_args(corpus, tmp_path / "one", tmp_path / "cache", *MODELS[model], steps=4)
    r = run_cli(one)
    assert r.returncode == 0, r.stderr[-3000:]
    cp = train_args(corpus, tmp_path / "cp", tmp_path / "cache", "--context-parallel", "2",
                    *MODELS[model], steps=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "deltanet.cli", *cp]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env_1thread())
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = losses(tmp_path / "cp"), losses(tmp_path / "one")
    assert sorted(got) == sorted(want) and len(want) == 4
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), s
    cfg = json.loads((tmp_path / "cp" / "config.json").read_text())
    assert cfg["train"]["context_parallel"] == 2
    ckpt = sorted((tmp_path / "cp" / "checkpoints").glob("step_*"))[-1]
    model_cfg = json.loads((ckpt / "config.json").read_text())
    assert model_cfg["layer_types"] == LAYER_TYPES[model]
    assert cfg["data"]["doc_mask"] == ("--no-doc-mask" not in MODELS[model])


@pytest.mark.parametrize("flags, match", [
    (["--context-parallel", "3", "--seq-len", "32"], "must be divisible by context_parallel"),
    (["--context-parallel", "2", "--fsdp"], "cannot be combined with fsdp"),
], ids=["indivisible", "fsdp"])
def test_context_parallel_bad_config(flags, match):
    with pytest.raises(ConfigError, match=match):
        build_train_config(["--max-steps", "1", *flags])
