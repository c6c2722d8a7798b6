"""TAFT across processes with ``torch.distributed`` (launched by ``torchrun``; gloo on the CPU,
nccl on GPUs): shards are dealt to ranks (rank ``r`` trains shards ``r, r + W, ...``) and the
results gathered to every rank; a shard too large for one device trains data-parallel (DDP)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``0, 1`` outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> torch.device:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment), and
    the device this process uses: ``cuda:LOCAL_RANK`` with nccl when CUDA is there, else the CPU
    with gloo."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def share(items: list) -> list:
    """This rank's items: ``items[rank::world]``."""
    rank, world = rank_and_world()
    return items[rank::world]


def gather(local: dict) -> dict:
    """Every rank's ``local`` dict merged (keys are disjoint across ranks), on every rank."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    parts = [None] * world
    dist.all_gather_object(parts, local)
    return {key: value for part in parts for key, value in part.items()}


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def data_parallel(model: torch.nn.Module, device: torch.device):
    """``model`` under ``DistributedDataParallel`` (frozen buffers are equal on every rank and are
    not broadcast each step), and this rank's part ``(rank, world)`` of every batch."""
    from torch.nn.parallel import DistributedDataParallel

    rank, world = rank_and_world()
    if world == 1:
        raise ValueError("data_parallel: expected a torch.distributed process group of 2 or more processes "
                         "(launch with torchrun), got none")  # fmt: skip
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False), (rank, world)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """``values`` summed over ranks."""
    if rank_and_world()[1] == 1:
        return values
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()
