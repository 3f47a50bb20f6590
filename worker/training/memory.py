"""Accelerator memory probes. On the CPU every probe answers None: there is no GPU memory to report, and a
zero would read as a measurement."""

from __future__ import annotations

import torch


class MemoryProbe:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            # Peaks from before this job (another job in the same process, model loading) must not count.
            torch.cuda.reset_peak_memory_stats(device)

    def allocated_bytes(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.on_cuda else None

    def reserved_bytes(self) -> int | None:
        return torch.cuda.memory_reserved(self.device) if self.on_cuda else None

    def peak_bytes(self) -> int | None:
        # Reserved, not allocated: the caching allocator's reservation is what the GPU must actually hold,
        # so it is the number that decides whether a job fits.
        return torch.cuda.max_memory_reserved(self.device) if self.on_cuda else None


# What c10's DefaultCPUAllocator says when malloc fails (alloc_cpu.cpp): a plain RuntimeError, not
# torch.OutOfMemoryError, which only the CUDA caching allocator raises (torch 2.13).
_CPU_ALLOCATOR_FAILURE = "DefaultCPUAllocator: can't allocate memory"


def ran_out_of_memory(exc: BaseException) -> bool:
    """An accelerator OOM, a failed host allocation in torch, or one in Python itself (MemoryError)."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and _CPU_ALLOCATOR_FAILURE in str(exc)
