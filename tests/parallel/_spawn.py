"""Run a test function in ``world_size`` CPU processes joined by a gloo process group.

The function runs in every process as ``fn(rank, world_size, *args)``; an exception in any
process fails the test with that process's traceback (``torch.multiprocessing.spawn``)."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world_size: int, init_file: str, fn, args) -> None:
    torch.set_num_threads(1)  # R processes share the CPU cores
    # a bounded wait: a collective one rank skips fails the test instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_entry, args=(world_size, init_file, fn, args), nprocs=world_size, join=True)
