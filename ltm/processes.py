"""The torchrun processes of a run: this process's rank and device, and summing over the processes.

Without torchrun a run is rank 0 of 1 and nothing is communicated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def resolve_device(device: str | None, local_rank: int, cuda_available: bool) -> torch.device:
    """The device of this process: None picks this process's GPU (or the CPU), and a bare "cuda"
    means this process's GPU, cuda:<local rank>, as torch.cuda.set_device needs an index."""
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    dev = torch.device(device)
    return torch.device("cuda", local_rank) if dev.type == "cuda" and dev.index is None else dev


@dataclass
class Processes:
    """This process's place among the torchrun processes of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device: str | None = None) -> "Processes":
        """This process's place, from torchrun's environment; joins the process group (once) and sets the GPU."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local, torch.cuda.is_available())
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank=dist.get_rank() if world > 1 else 0, world=world, device=dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def broadcast(self, obj: T) -> T:
        """rank 0's value of a picklable object, on every process."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def all_reduce_gradients(model: torch.nn.Module, procs: Processes) -> None:
    """Sum every gradient over the processes with one coalesced all-reduce."""
    if procs.world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
