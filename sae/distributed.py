"""The processes of a torch.distributed job as the training loop sees them.

Under torchrun (which sets RANK, WORLD_SIZE and the rendezvous address) `process_group()`
joins the default group; run plainly, it is one process and every collective is the
identity, so single-process training runs the very same operations as before. CPU tensors
(flags, metrics, the latent cache's statistics) go over gloo; where CUDA is present, CUDA
tensors (a GPU run's gradients) go over NCCL, and each process takes the GPU of its local
rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from sae.errors import UserError

# Where a process trains: `auto` is its GPU when torch sees CUDA, else the CPU.
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the job: rank `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, results and the store; the others only compute."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of `items`, which divide evenly by the world size."""
        share = items.shape[0] // self.world_size
        return items[self.rank * share : (self.rank + 1) * share]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over the ranks, in place (and returned)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of `tensor` over the ranks, in place (and returned)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world_size)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any: ranks agree to stop together."""
        if not self.is_distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def send(self, tensor: torch.Tensor, to: int) -> None:
        dist.send(tensor.contiguous(), dst=to)

    def receive(self, like: torch.Tensor, source: int) -> torch.Tensor:
        """A tensor of `like`'s shape and type, sent by rank `source`."""
        tensor = torch.empty_like(like)
        dist.recv(tensor, src=source)
        return tensor

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def process_group() -> ProcessGroup:
    """This process's group: joins torchrun's job on first call, else a group of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return ProcessGroup()
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and _local_rank() < torch.cuda.device_count():
            torch.cuda.set_device(_local_rank())
            backend = "cpu:gloo,cuda:nccl"
        try:
            dist.init_process_group(backend=backend)
        except ValueError as error:
            raise UserError(
                f"WORLD_SIZE is {world_size} but the job's rendezvous is not set up "
                f"({error}): start the command with torchrun"
            ) from None
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def process_device(choice: Device) -> torch.device:
    """The device this process trains on: with `auto`, its GPU (under torchrun the GPU of
    its local rank, set by `process_group`) when torch sees CUDA, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            "--device cuda, but torch sees no CUDA device (no GPU, or a CPU build of torch): "
            "use --device cpu, or install a CUDA build of torch"
        )
    gpus = torch.cuda.device_count()
    if _local_rank() >= gpus:
        raise UserError(
            f"process {_local_rank()} of this node has no GPU of its own ({gpus} seen): "
            f"start at most {gpus} processes a node (--nproc-per-node), or use --device cpu"
        )
    return torch.device("cuda", torch.cuda.current_device())
