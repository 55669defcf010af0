"""One process or several under `torchrun`: rank, device, and the few collectives training needs.

`torchrun --nproc_per_node N -m gradq_fx train ...` sets WORLD_SIZE, RANK and LOCAL_RANK;
`Distributed.setup` then joins the process group (nccl on CUDA, gloo on CPU). Without them
the run is a single process and every collective here is the identity.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import os
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # this object initialised the process group and destroys it at the end

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the files and prints the progress."""
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto", timeout: float = 1800.0) -> Distributed:
        """Pick the device ('auto': CUDA when present) and join torchrun's process group.

        timeout: seconds a collective waits for the other processes; past it, the waiting
        process fails with the collective's error (a process left alone by another that
        skipped or never reached a collective stops, rather than waiting for ever)."""
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        owns_group = False
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=datetime.timedelta(seconds=timeout),
            )
            owns_group = True
        rank = dist.get_rank() if world_size > 1 else 0
        if use_cuda:
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            target = torch.device("cuda", local_rank)
        else:
            target = torch.device("cpu")
        return cls(rank, world_size, target, owns_group)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of `tensor` over all processes (in place)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        """[value of rank 0, value of rank 1, ...]."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around `model` when there are several processes."""
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def close(self) -> None:
        """Destroy the process group this object initialised. Free the DDP wrappers first.

        Under torch 2.11 (2 CPU processes, gloo; 3 runs in 12 of the torchrun test, 0 in 14
        with this order) rank 0 deadlocked at exit: its DDP reducer, freed after
        `destroy_process_group`, held the group's last reference, so the group's destructor
        ran with the GIL held and joined a gloo worker that was freeing a finished
        all-gather's tensors, which needs the GIL. Freed by `destroy_process_group` itself,
        the group's destructor releases the GIL. The collection here frees wrappers kept
        only by reference cycles."""
        if self.owns_group:
            gc.collect()
            dist.destroy_process_group()
