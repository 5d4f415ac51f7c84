"""torchrun / DistributedDataParallel plumbing: NCCL on GPUs (with gloo for CPU tensors), gloo on CPUs; a single
process needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    from ..errors import UserError

    if spec == 'auto':
        return torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    dev = torch.device(spec)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f"device {spec!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', local_rank)
    return dev


def process_group_backend(device: torch.device) -> str:
    """gloo on CPUs; on GPUs NCCL for the CUDA tensors (gradients, BatchNorm statistics) and gloo beside it for the
    small CPU tensors the trainer also reduces (the non-finite-loss flag, loss sums, evaluation counts, the
    self-distillation table): NCCL alone cannot reduce a CPU tensor ("No backend type associated with device type
    cpu")."""
    return 'cpu:gloo,cuda:nccl' if device.type == 'cuda' else 'gloo'


def init_distributed(device: str = 'auto') -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); start the process group when there are several."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local = int(os.environ.get('LOCAL_RANK', '0'))
    dev = pick_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group(process_group_backend(dev))
    return DistInfo(rank, world, local, dev)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
