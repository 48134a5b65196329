"""Data parallelism applied from outside the model and the trainer (torchtitan's separation).

`loopmdm train` under `torchrun --nproc_per_node N` gets a DDP context: one process per
device, the model wrapped in DistributedDataParallel, gradients synchronised on the last
micro-batch only. Every rank draws the same loop count S from (seed, step) (training/loops.py),
so no rank waits at a different depth. Without torchrun it is the single-process context.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class DistContext:
    """Single-process defaults (no torchrun); DDPContext below is the torchrun/DDP version."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, wrapped: torch.nn.Module):
        return nullcontext()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def barrier(self) -> None:
        pass

    def any(self, flag: bool) -> bool:
        """True if `flag` is set on any rank."""
        return flag


class DDPContext(DistContext):
    def __init__(self, rank: int, world_size: int, device: torch.device):
        super().__init__(rank=rank, world_size=world_size)
        self.device = device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def no_sync(self, wrapped: torch.nn.Module):
        return wrapped.no_sync()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        return value / self.world_size

    def barrier(self) -> None:
        torch_dist.barrier()

    def any(self, flag: bool) -> bool:
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())


@contextmanager
def dist_context(device: str = "auto"):
    """Yield a DDPContext under torchrun (WORLD_SIZE > 1), else the single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield DistContext()
        return
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield DDPContext(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
    finally:
        torch_dist.destroy_process_group()
