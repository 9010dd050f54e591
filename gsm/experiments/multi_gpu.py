"""Multi-process training under torchrun: process-group set-up and DistributedDataParallel wrapping."""
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class ProcessContext:
    """Where this process trains: its rank among `world_size` processes and its device."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_writer(self) -> bool:
        """Only rank 0 writes logs and files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_process(device: str) -> ProcessContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL with one GPU per process
    (cuda:LOCAL_RANK) on CUDA, gloo on CPU. A single process just uses `device`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    requested = torch.device(device)
    if requested.type == "cuda":
        requested = torch.device("cuda", local_rank)
        torch.cuda.set_device(requested)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if requested.type == "cuda" else "gloo")
    return ProcessContext(rank=rank, world_size=world_size, device=requested)


def wrap_model(model: nn.Module, context: ProcessContext, compile_mode: Optional[str] = None) -> nn.Module:
    """The training form of `model`, in this order: SyncBatchNorm layers when several processes train on
    CUDA (BatchNorm statistics over the global batch, as one process with the whole batch computes them);
    then `torch.compile` with `compile_mode` (None: eager), so that the compiled graph holds the synchronised
    layers; then DistributedDataParallel when there are several processes. DDP averages the gradients over
    the ranks during backward, so GSM ranks the same gradients and selects the same mask on every rank."""
    if context.distributed and context.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if compile_mode is not None:
        model = torch.compile(model, mode=compile_mode)
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank0_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag`, on every rank (the flag itself in a single process): how the other ranks learn that
    rank 0 gave up, instead of waiting for it in the next collective."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over ranks (the tensor itself in a single process)."""
    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
