"""Data parallelism under torchrun, and the same interface for one process.

`World.from_env()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts
torch.distributed: gloo on CPU, NCCL on CUDA. Every collective the trainer needs goes through this
class, so the loop reads the same for one process and for many. A timeout on the process group
turns a dead rank into an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lorasp_edge.errors import UserError


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def single(cls, device: torch.device | None = None) -> "World":
        return cls(device=device or torch.device("cpu"))

    @classmethod
    def from_env(cls, device: torch.device) -> "World":
        """torchrun's world, or a single process. LORASP_EDGE_DIST_TIMEOUT (seconds, default 300)
        bounds every wait on another rank: rendezvous and each collective."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls.single(device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        timeout_s = float(os.environ.get("LORASP_EDGE_DIST_TIMEOUT", "300"))
        if device.type == "cuda":
            gpus = torch.cuda.device_count()
            if local_rank >= gpus:
                # Each rank takes its own GPU (cuda:LOCAL_RANK); sharing one would need NCCL to run two
                # ranks on a device, which it refuses. Stop every rank with a line rather than a CUDA error.
                local_size = os.environ.get("LOCAL_WORLD_SIZE", "?")
                raise UserError(
                    f"rank {rank} of {size}: {local_size} processes on this node but {gpus} GPU(s); each rank needs its own: "
                    f"use --nproc-per-node {max(gpus, 1)} or fewer (or --device cpu)"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            try:
                dist.init_process_group(
                    backend="nccl" if device.type == "cuda" else "gloo",
                    timeout=datetime.timedelta(seconds=timeout_s),
                )
            except dist.DistError as error:
                address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise UserError(
                    f"rank {rank} of {size}: the other ranks did not join at {address} within {timeout_s:g} s "
                    f"({_first_line(error)})"
                ) from None
        return cls(rank=rank, size=size, local_rank=local_rank, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _collective_device(self) -> torch.device:
        # NCCL moves CUDA tensors only; gloo takes CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        moved = tensor.to(self._collective_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        return moved.cpu()

    def any_true(self, flag: bool) -> bool:
        """True on every rank if it is true on any (one small all-reduce: a sync point)."""
        if not self.distributed:
            return bool(flag)
        return bool(self.all_reduce_sum(torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)).item() > 0)

    def gather_objects(self, obj) -> list:
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Masks are identical on every rank by construction (seeded per module name): no buffer broadcast.
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def no_sync_unless(self, module: torch.nn.Module, last: bool):
        """Skip the gradient all-reduce on every micro-batch but the last of a step."""
        if self.distributed and not last and isinstance(module, torch.nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
