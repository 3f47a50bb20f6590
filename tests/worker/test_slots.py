"""A worker's device slots (worker/slots.py): first come, first served, so a 2-device request is not overtaken
by 1-device requests that arrive after it, and the devices it waits for collect for it."""

from __future__ import annotations

import threading
import time

import pytest

from worker.slots import DeviceSlots, NotEnoughSlots, worker_slots


class Request(threading.Thread):
    def __init__(self, slots: DeviceSlots, count: int, log: list) -> None:
        super().__init__(daemon=True)
        self.slots, self.count, self.log, self.granted = slots, count, log, None
        self.stop = threading.Event()

    def run(self) -> None:
        self.granted = self.slots.acquire(self.count, give_up=self.stop.is_set, poll_seconds=0.05)
        self.log.append(self)


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_two_slot_request_is_not_overtaken_by_later_one_slot_requests():
    slots, granted = DeviceSlots(["0", "1"], on_gpus=True), []
    first = slots.acquire(1, give_up=lambda: False)  # a 1-GPU job runs
    wide = Request(slots, 2, granted)
    wide.start()
    wait_until(lambda: len(slots._waiting) == 1)
    narrow = [Request(slots, 1, granted) for _ in range(3)]
    for request in narrow:  # a stream of 1-GPU jobs behind it; one GPU is free all along
        request.start()
    wait_until(lambda: len(slots._waiting) == 4)
    time.sleep(0.2)
    assert granted == []  # the free GPU is kept for the head of the line
    slots.release(first)
    wait_until(lambda: len(granted) == 1)
    assert granted == [wide] and sorted(wide.granted) == ["0", "1"]
    assert slots.visible_devices(wide.granted) == "0,1"
    slots.release(wide.granted)
    wait_until(lambda: len(granted) == 3)  # two 1-GPU jobs side by side, the third waits
    assert granted[1:] == narrow[:2] and {granted[1].granted[0], granted[2].granted[0]} == {"0", "1"}
    slots.release(granted[1].granted)
    wait_until(lambda: len(granted) == 4)
    assert granted[3] is narrow[2]


def test_a_request_gives_up_on_a_drain_and_leaves_the_line():
    slots, granted = DeviceSlots(["0"], on_gpus=True), []
    held = slots.acquire(1, give_up=lambda: False)
    waiting = Request(slots, 1, granted)
    waiting.start()
    wait_until(lambda: len(slots._waiting) == 1)
    waiting.stop.set()
    wait_until(lambda: len(granted) == 1)
    assert waiting.granted is None and not slots._waiting
    slots.release(held)
    assert slots.acquire(1, give_up=lambda: True) == ["0"]  # free at once: give_up is not even asked


def test_more_devices_than_the_worker_has_is_refused_at_once():
    with pytest.raises(NotEnoughSlots, match="needs 4 devices; this worker has 2"):
        worker_slots([], cpu_ranks=2).acquire(4, give_up=lambda: False)


def test_a_cpu_worker_has_its_cpu_ranks_and_no_cuda_devices():
    slots = worker_slots([], cpu_ranks=3)
    assert slots.size == 3 and slots.visible_devices(slots.acquire(2, give_up=lambda: False)) is None
    assert worker_slots([0, 1], cpu_ranks=3).devices == ["0", "1"]  # GPUs win over the CPU setting
