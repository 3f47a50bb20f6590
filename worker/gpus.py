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
        gpus.append(GpuInfo(index, pynvml.nvmlDeviceGetName(handle), pynvml.nvmlDeviceGetMemoryInfo(handle).total))
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


@dataclass(frozen=True)
class GpuReading:
    index: int
    used_memory_bytes: int
    total_memory_bytes: int
    utilization_ratio: float | None  # None where NVML has no utilisation counter (MIG instances, some vGPUs)


def read_gpus() -> list[GpuReading]:
    """Memory in use (by every process, as nvidia-smi shows it) and utilisation of each GPU, right now."""
    if not _nvml_available():
        return []
    readings = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
        except pynvml.NVMLError:
            utilization = None
        readings.append(GpuReading(index, memory.used, memory.total, utilization))
    return readings


@dataclass(frozen=True)
class GpuIdentity:
    model: str  # NVML's name, as list_gpus registers it: the key the planner's learned corrections go by
    driver: str


def identity(visible_devices: str | None) -> GpuIdentity | None:
    """The model of the first GPU in a job's CUDA_VISIBLE_DEVICES (one worker's GPUs are taken to be alike) and
    the driver; None on a CPU worker or without NVML."""
    if not visible_devices or not _nvml_available():
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible_devices.split(",")[0]))
        return GpuIdentity(pynvml.nvmlDeviceGetName(handle), pynvml.nvmlSystemGetDriverVersion())
    except (pynvml.NVMLError, ValueError):  # a device gone since the job started, a UUID-style device list
        return None
