"""The devices of one worker and which running job holds each: how 1-GPU jobs share an 8-GPU machine and how a
4-GPU job still gets its four.

A worker has one slot per GPU (NVML), or on a machine without one FTJOBS_CPU_RANKS CPU slots (each a gloo rank).
Every job takes resources.num_gpus slots for its whole attempt; its training processes see only those GPUs
(CUDA_VISIBLE_DEVICES).

Policy: first come, first served, strictly. Requests are granted in the order they arrived, and a request
that cannot be granted yet blocks every later one on this worker, even a smaller one that would fit now. So as
1-GPU jobs end, their GPUs collect for the 4-GPU job at the head instead of going to the stream of 1-GPU jobs
behind it: it waits at most for the jobs already running, never for ones that came after it. The price is
idle GPUs while the head request gathers its slots (no backfill).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class NotEnoughSlots(Exception):
    """The job needs more devices than this worker has at all: another worker must take it."""


class DeviceSlots:
    def __init__(self, devices: list[str], on_gpus: bool) -> None:
        self.devices, self.on_gpus = list(devices), on_gpus
        self._free = list(devices)
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def size(self) -> int:
        return len(self.devices)

    def acquire(self, count: int, give_up: Callable[[], bool], poll_seconds: float = 0.5) -> list[str] | None:
        """`count` devices once this request is at the head of the line and they are free; None if give_up()
        answers True first (a drain)."""
        if count > self.size:
            raise NotEnoughSlots(f"needs {count} devices; this worker has {self.size}")
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or len(self._free) < count:
                    if give_up():
                        return None
                    self._changed.wait(poll_seconds)
                granted, self._free = self._free[:count], self._free[count:]
                return granted
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()

    def release(self, devices: list[str]) -> None:
        with self._changed:
            self._free = sorted(self._free + devices, key=self.devices.index)
            self._changed.notify_all()

    def visible_devices(self, granted: list[str]) -> str | None:
        """CUDA_VISIBLE_DEVICES for a job holding `granted`; None on a CPU worker."""
        return ",".join(granted) if self.on_gpus else None


def worker_slots(gpu_indices: list[int], cpu_ranks: int) -> DeviceSlots:
    """One slot per GPU; a worker with no GPU has cpu_ranks CPU slots."""
    if gpu_indices:
        return DeviceSlots([str(index) for index in gpu_indices], on_gpus=True)
    return DeviceSlots([f"cpu{rank}" for rank in range(cpu_ranks)], on_gpus=False)
