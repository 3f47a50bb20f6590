"""One worker with two CPU slots (what an 2-GPU machine is to the scheduler), running real jobs through
execute_job in a thread per task, as its Celery thread pool does: a 2-rank job waits for both slots and is not
overtaken by the 1-rank jobs queued after it; once it is done, two 1-rank jobs train side by side."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select
from test_resume import wait_for_event

from worker.execution import execute_job
from worker.shutdown import ShutdownRequest
from worker.slots import worker_slots


@pytest.fixture(scope="module")
def scheduling_dataset(data_root):
    rows = [{"instruction": f"Name {i}.", "output": f"item {i}"} for i in range(8)]
    (data_root / "scheduling.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return "scheduling.jsonl"


def spec(model_dir, dataset: str, ranks: int, steps: int) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": steps, "micro_batch_size": 1, "max_seq_length": 48, "logging_steps": 1},
        "memory": {"precision": "fp32", "optimizer": "adamw"},
        "resources": {"num_gpus": ranks, "sharding": "zero3"} if ranks > 1 else {},
    }


def attempt_times(job_id: str) -> tuple[float, float]:
    from service.db import transaction
    from service.models import JobAttempt

    with transaction() as session:
        attempt = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)).one()
        return attempt.started_at.timestamp(), attempt.ended_at.timestamp()


def test_a_two_rank_job_waits_for_two_free_slots_and_one_rank_jobs_share_the_worker(
    api, settings, store_queued_job, tiny_model, scheduling_dataset
):
    slots, shutdown, outcomes = worker_slots([], cpu_ranks=2), ShutdownRequest(), {}

    def deliver(job_id: str) -> threading.Thread:
        """What the broker does: hand the job id to one of the worker's threads."""
        thread = threading.Thread(
            target=lambda: outcomes.__setitem__(job_id, execute_job(job_id, settings, "slots@test", shutdown, slots)),
            daemon=True,
        )
        thread.start()
        return thread

    long_single = store_queued_job(spec(tiny_model, scheduling_dataset, 1, 40))
    two_rank = store_queued_job(spec(tiny_model, scheduling_dataset, 2, 6))
    later_singles = [store_queued_job(spec(tiny_model, scheduling_dataset, 1, 20)) for _ in range(2)]
    threads = [deliver(long_single)]
    wait_for_event(api, long_single, "progress")  # training on one slot; the other is free
    threads.append(deliver(two_rank))
    wait_until(lambda: len(slots._waiting) == 1)
    threads += [deliver(job_id) for job_id in later_singles]
    wait_until(lambda: len(slots._waiting) == 3)
    for thread in threads:
        thread.join(timeout=600)
    assert {job_id: status.value for job_id, status in outcomes.items()} == dict.fromkeys(
        [long_single, two_rank, *later_singles], "succeeded"
    )
    first, wide = attempt_times(long_single), attempt_times(two_rank)
    singles = [attempt_times(job_id) for job_id in later_singles]
    assert wide[0] >= first[1]  # it waited for the second slot ...
    assert all(start >= wide[1] for start, _ in singles)  # ... and no later 1-rank job took the free one meanwhile
    (start_a, end_a), (start_b, end_b) = singles
    assert start_a < end_b and start_b < end_a  # then two 1-rank jobs trained at the same time


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
