"""Which calls go through ``torch.compile`` on CUDA (``layers/_fused.py``), checked on CPU.

On the H200 an eager fp32 elementwise chain in the training path cost deltanet-340m 45% of its
speed (results/2026-11-30-h200-x2-model.md) while every CPU test passed. These tests pretend the
tensors are on CUDA (``_fused._compiles_on`` patched to accept any device) and replace ``torch.compile``
by a recorder, then check that a training step routes the elementwise glue -- including the
no-autograd forward of the recomputed mixer input region -- through the compiled wrappers, and
that inference (decoding) stays eager.
"""

from __future__ import annotations

import pytest
import torch

import deltanet.layers._fused as fz
from deltanet.layers.delta_net import DeltaNetMixer
from deltanet.models import DeltaNetForCausalLM, get_config


@pytest.fixture
def compile_log(monkeypatch):
    """``[(function name, grad enabled)]`` for every call that would have run compiled."""
    log = []

    def recorder(fn, *args, **kwargs):
        def run(*a, **kw):
            log.append((fn.__name__, torch.is_grad_enabled()))
            return fn(*a, **kw)
        return run

    monkeypatch.setattr(torch, "compile", recorder)
    for wrapper in fz.REGISTRY:  # compiled versions are made on first use: start without any
        monkeypatch.setattr(wrapper, "compiled", None)
    monkeypatch.setattr(fz, "_compiles_on", lambda x: True)  # every device counts as CUDA
    yield log


def _model():
    torch.manual_seed(0)
    return DeltaNetForCausalLM(get_config("tiny", vocab_size=64, delta_backend="torch"))


@pytest.mark.parametrize("recompute", [False, True])
def test_training_step_runs_the_glue_compiled(compile_log, monkeypatch, recompute):
    monkeypatch.setattr(DeltaNetMixer, "recompute_inputs", recompute)
    model = _model().train()
    ids = torch.randint(0, 64, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    names = {name for name, _ in compile_log}
    assert {"rms_norm_linear", "_padded_conv", "l2_norm", "swiglu_linear", "rms_norm"} <= names, names
    if recompute:
        # the input region's forward runs without autograd and must still be compiled ...
        no_grad = {name for name, grad in compile_log if not grad}
        assert {"rms_norm_linear", "_padded_conv"} <= no_grad, compile_log
        # ... and its rerun in backward too
        assert ("_padded_conv", True) in compile_log
    else:
        assert all(grad for _, grad in compile_log), compile_log
    assert fz._FORCE is False  # restored after the recomputing forward


def test_inference_stays_eager(compile_log):
    model = _model().eval()
    ids = torch.randint(3, 64, (1, 8))
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert compile_log == []
