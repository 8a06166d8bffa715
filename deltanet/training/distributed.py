"""Process-group setup and model wrapping for data-parallel training.

``torchrun --nproc-per-node N deltanet train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`setup` then joins the group (NCCL on CUDA, gloo on CPU). A plain
``deltanet train`` runs as a world of one without any process group.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "configure_cpu_threads", "context_parallel_batch", "context_parallel_group", "setup", "wrap_model"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=op)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto") -> Dist:
    """Pick the device and, under torchrun, initialise the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        dev = torch.device("cuda", local_rank if world > 1 or device == "cuda" else int(device.split(":")[1]))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def context_parallel_group(d: Dist, size: int):
    """``(group, dp_rank, dp_size)`` for context parallelism over ``size`` consecutive ranks:
    ranks ``[i size, (i + 1) size)`` hold segments of the same rows (data-parallel rank ``i``).
    ``size == 1``: ``(None, rank, world_size)``."""
    if size == 1:
        return None, d.rank, d.world_size
    if d.world_size % size:
        raise ValueError(f"context_parallel ({size}) must divide the number of processes ({d.world_size})")
    groups = [dist.new_group(list(range(i, i + size))) for i in range(0, d.world_size, size)]  # all ranks make all
    return groups[d.rank // size], d.rank // size, d.world_size // size


def context_parallel_batch(batch: dict, group) -> dict:
    """A ``make_batch`` batch -> this rank's segment: its ``input_ids`` and its targets already
    shifted (the model cannot shift across ranks), plus the group for the model's
    ``context_parallel`` argument. Rows ``[B, T]`` split along T; a packed batch (``[1, B*T]``
    with ``cu_seqlens``) splits its one row and keeps the whole row's ``cu_seqlens``, which the
    model cuts to each segment (documents may span ranks)."""
    from deltanet.parallel import split_segment

    ids, labels = batch["input_ids"], batch["labels"]
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
    out = {"input_ids": split_segment(ids, 1, group), "labels": split_segment(targets, 1, group),
           "context_parallel": group}
    if batch.get("cu_seqlens") is not None:
        out["cu_seqlens"] = batch["cu_seqlens"]
    return out


def wrap_model(model: torch.nn.Module, d: Dist, fsdp: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard`` per decoder layer, then the root) with ``fsdp``."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    # The biggest ModuleList is the decoder stack whatever the attribute path is called.
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def configure_cpu_threads(requested: int = 0, procs_per_host: int = 1) -> str:
    """Set torch's intra-op threads for CPU work; returns a note for the log.

    ``requested > 0`` pins it. Auto (0): torch's default split over this host's processes,
    cut to the cores that are idle right now. With more busy threads than cores, OpenMP's
    spin-waiting made a 2-thread training step 10-30x slower than a 1-thread one on a busy
    2-core box. "Right now" is a 0.2 s sample of /proc/stat where there is one: the 1-minute
    load average still counts a pip install that just finished. The trainer records the count
    so that a resumed run (bit-exact on CPU only with the same count) uses it again.
    """
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} thread(s)"
    cores = os.cpu_count() or 1
    share = max(1, min(torch.get_num_threads(), cores // max(1, procs_per_host)))
    busy, how = _busy_cores(cores)
    n = max(1, min(share, round(cores - busy)))
    torch.set_num_threads(n)
    return f"{n} thread(s) (auto: {busy:.1f} of {cores} cores busy, {how})"


def _busy_cores(cores: int, interval: float = 0.2) -> tuple[float, str]:
    """Cores in use by other processes: measured over ``interval`` on Linux, else the load average."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
        if total1 > total0:
            return cores * (1.0 - (idle1 - idle0) / (total1 - total0)), f"measured over {interval:g}s"
    except (OSError, ValueError, IndexError):
        pass
    if hasattr(os, "getloadavg"):
        return os.getloadavg()[0], "1-minute load average"
    return 0.0, "no load information"
