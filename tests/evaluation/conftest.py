"""Fixtures of the evaluation tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Train with one intra-op thread: on the 2-core CI machine, with other test workers
    running, two OpenMP threads per process oversubscribe the cores and tiny-model steps get
    ~10-40x slower (measured: 4 s vs 0.09 s per MQAR step)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
