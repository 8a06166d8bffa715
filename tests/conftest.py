import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is *decorated*, i.e. when its module is first
# imported. Set it here, before any test module imports deltanet's kernels, so that every
# @triton.jit function in the process is built for the interpreter on CPU-only machines (a mix
# of interpreted kernels calling compiled helpers fails with "Cannot call @triton.jit'd outside
# of the scope of a kernel"). On a GPU the same tests run compiled, at full size.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _hf_generate_loop(request, monkeypatch):
    """``model.generate`` runs Hugging Face's loop (over ``decode_step`` and its CUDA graph) in every
    test but those marked ``fast_generate``: the tests written for that loop keep testing it, and
    ``tests/models/test_fast_generate.py`` tests the captured-loop fast path against it."""
    if request.node.get_closest_marker("fast_generate") is None:
        from deltanet.models import DeltaNetForCausalLM

        monkeypatch.setattr(DeltaNetForCausalLM, "fast_generate", False)
