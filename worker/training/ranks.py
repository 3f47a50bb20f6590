"""The ranks of one job under torchrun: rank 0 speaks for the job (progress, checkpoints, artifacts, the result);
every rank trains its share of each global micro-batch.

A job on one device is Ranks() (rank 0 of 1), and every call here is then a no-op on the value it is given, so
the recipe reads the same either way. A sharded job (resources.sharding, or num_gpus > 1) joins the process group
torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment): NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# How long a collective may wait for the slowest rank. Rank 0 waits for the worker to upload each checkpoint
# before it joins the next step's collective, and a large model's sharded checkpoint can take many minutes to
# reach S3; torch's default (10 min on NCCL) would kill the job there. A rank that dies is noticed at once anyway
# (its connections close), so only a hung rank waits this long.
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, rows: Sequence[T]) -> list[T]:
        """This rank's rows of a global micro-batch: every world-th row from its own rank on."""
        return list(rows[self.rank :: self.world])

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks (in place)."""
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def from_main(self, flag: bool) -> bool:
        """Rank 0's answer on every rank: decisions (drain) that all ranks must take at the same step."""
        if not self.distributed:
            return flag
        carried = torch.tensor([int(flag)], device=_collective_device())
        dist.broadcast(carried, src=0)
        return bool(carried.item())

    def every(self, value: int | None) -> list[int | None]:
        """Each rank's value (a peak memory reading), in rank order; None stays None."""
        if not self.distributed:
            return [value]
        mine = torch.tensor([-1 if value is None else value], dtype=torch.int64, device=_collective_device())
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        return [None if (reading := int(t.item())) < 0 else reading for t in gathered]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _collective_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo only host ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def lost_a_peer(exc: BaseException) -> bool:
    """A collective that failed because another rank of the job died (killed, out of memory): gloo raises a
    RuntimeError from its TCP transport, NCCL a DistBackendError. Retrying the attempt resumes the job."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and ("gloo/transport" in str(exc) or "NCCL" in str(exc))


def join_process_group() -> Ranks:
    """Join the group torchrun started this process in; the rank's GPU (LOCAL_RANK) becomes the current one.
    Outside torchrun (the single-rank path of a benchmark), a group of one in this process."""
    options: dict = {"timeout": COLLECTIVE_TIMEOUT}
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        options["device_id"] = torch.device("cuda", local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend, **options)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **options)
    return Ranks(dist.get_rank(), dist.get_world_size(), distributed=True)


def leave_process_group(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
