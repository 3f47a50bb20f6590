"""What GPUs this machine has and how much memory a process uses on them, read through NVML.

NVML needs no CUDA context, so the Celery worker process can ask without holding GPU memory itself.
On a machine without an NVIDIA driver every function answers "none" rather than inventing readings.
"""

from __future__ import annotations

from dataclasses import dataclass

import pynvml


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_memory_bytes: int


def _nvml_available() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    return True


def list_gpus() -> list[GpuInfo]:
    if not _nvml_available():
        return []
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        gpus.append(GpuInfo(index, pynvml.nvmlDeviceGetName(handle),
                            pynvml.nvmlDeviceGetMemoryInfo(handle).total))
    return gpus


def process_used_bytes(pid: int) -> int | None:
    """The memory NVML attributes to `pid` across all GPUs: what nvidia-smi shows and what must fit."""
    if not _nvml_available():
        return None
    used = None
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory is not None:
                used = (used or 0) + process.usedGpuMemory
    return used
