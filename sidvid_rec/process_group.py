"""Process-group setup and collectives: torchrun/TorchX environment -> gloo (CPU) or nccl (CUDA).

Below every stage that needs to know its rank (training, evaluation, checkpoints), so none
of them imports another for it.

A single process without ``WORLD_SIZE`` in its environment still gets a one-rank gloo
group (on a private file store), so the same DistributedModelParallel code path runs
everywhere.
"""

import datetime
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sidvid_rec.errors import ConfigError


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``cpu``, or ``cuda:<local_rank % visible devices>`` for ``cuda`` (and ``auto`` when CUDA is available)."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but CUDA is not available")
        # LOCAL_RANK can exceed the visible devices (e.g. CUDA_VISIBLE_DEVICES narrowed per rank).
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Joins (or creates) the default process group; idempotent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
        else:  # a lone process: a private store, no port to collide on
            store = dist.FileStore(tempfile.mktemp(prefix="sidvid_store_"), 1)
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def collective_device(ctx: DistContext) -> torch.device:
    """Where a tensor handed to a collective must live: the rank's GPU under nccl (nccl reduces
    only CUDA tensors), the CPU under gloo (whatever device the model trains on)."""
    return ctx.device if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks (a no-op copy for one rank), on :func:`collective_device`; the result is on
    ``tensor``'s device. Float64 sums stay on the CPU under gloo."""
    if ctx.world_size == 1:
        return tensor
    work = tensor.to(collective_device(ctx))
    dist.all_reduce(work)
    return work.to(tensor.device)


def all_reduce_max_int(value: int, ctx: DistContext) -> int:
    """The largest ``value`` over ranks (e.g. the worst exit code), through a tensor on
    :func:`collective_device` (a CPU tensor under nccl fails)."""
    if ctx.world_size == 1:
        return int(value)
    work = torch.tensor([int(value)], dtype=torch.int64, device=collective_device(ctx))
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    return int(work.item())


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()
