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
