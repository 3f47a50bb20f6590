"""Fault injection against real processes: each case breaks one part of a running deployment and asserts that
every job still finishes exactly once, with attempts that never overlap, resuming from its checkpoints."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from harness import PG_ADMIN_URL, ProcessWatcher, _running, job_spec, wait_until

pytestmark = [pytest.mark.timeout(420)]
STALE_EXIT_SECONDS = 5  # how long a superseded attempt's process may take to notice and exit once resumed


def start_checkpointed_job(stack, watcher: ProcessWatcher, spec: dict) -> tuple[str, dict, dict]:
    """Submit, and wait until attempt 1 runs and has stored a checkpoint: (job id, attempt, checkpoint event)."""
    job_id = watcher.watch(stack.submit(spec))
    first = stack.running_attempt(job_id, 1)
    return job_id, first, stack.wait_for_checkpoint(job_id, 1)


def test_worker_killed_with_its_training_process_is_taken_over_by_another(stack, tiny_model, fault_dataset):
    with ProcessWatcher(stack) as watcher:
        job_id, first, checkpoint = start_checkpointed_job(stack, watcher, job_spec(tiny_model, fault_dataset))
        stack.worker_of(first["worker"]).signal_group(signal.SIGKILL)  # and it never comes back
        job = stack.wait_for_end(job_id)
    stack.assert_succeeded_once(job)
    lost, taken_over = job["attempts"]
    assert lost["outcome"] == "lease_expired" and taken_over["worker"] != lost["worker"]
    assert taken_over["resumed_from_step"] >= checkpoint["data"]["step"] > 0
    assert not watcher.overlaps


def test_killed_training_process_resumes_as_a_new_attempt(stack, tiny_model, fault_dataset):
    with ProcessWatcher(stack) as watcher:
        job_id, _, checkpoint = start_checkpointed_job(stack, watcher, job_spec(tiny_model, fault_dataset))
        os.kill(stack.child_pid(job_id, 1), signal.SIGKILL)
        job = stack.wait_for_end(job_id)
    stack.assert_succeeded_once(job)
    crashed, resumed = job["attempts"]
    assert crashed["outcome"] == "crashed" and f"code -{signal.SIGKILL}" in crashed["detail"]
    assert resumed["resumed_from_step"] >= checkpoint["data"]["step"] > 0
    assert not watcher.overlaps


def test_redis_restarted_empty_while_jobs_queue_and_run(stack, tiny_model, fault_dataset):
    with ProcessWatcher(stack) as watcher:
        job_ids = [stack.submit(job_spec(tiny_model, fault_dataset, max_steps=60)) for _ in range(4)]
        for job_id in job_ids:
            watcher.watch(job_id)
        wait_until(lambda: sum(stack.job(j)["status"] == "running" for j in job_ids) == 2, 120, "two jobs running")
        assert sum(stack.job(j)["status"] == "queued" for j in job_ids) == 2
        stack.redis.kill()  # its queued messages are gone with it
        time.sleep(2)
        stack.redis.start()  # empty
        jobs = [stack.wait_for_end(job_id, 300) for job_id in job_ids]
    for job in jobs:
        stack.assert_succeeded_once(job)
    resent = [line for worker in stack.workers.values() for line in worker.lines if "sending it again" in line]
    assert resent, "the lost messages of the queued jobs were never re-sent"
    assert not watcher.overlaps


def test_api_killed_during_a_burst_of_submissions(stack, tiny_model, fault_dataset):
    burst = uuid.uuid4().hex[:8]
    accepted: list[str] = []
    failures: list[str] = []

    def post(index: int) -> None:
        spec = {**job_spec(tiny_model, fault_dataset, max_steps=6), "metadata": {"burst": burst, "n": str(index)}}
        try:
            response = httpx.post(f"{stack.url}/v1/jobs", json=spec, headers=stack.headers, timeout=30)
        except httpx.HTTPError as exc:
            failures.append(type(exc).__name__)
            return
        if response.status_code == 201:
            accepted.append(response.json()["id"])

    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(post, index) for index in range(16)]
        wait_until(lambda: len(accepted) >= 3, 60, "the first submissions to be accepted", 0.01)
        stack.api.signal_group(signal.SIGKILL)
        for future in futures:
            future.result()
    assert accepted and failures, (accepted, failures)  # some got through, some saw the API die
    rows = stack.job_ids_tagged("burst", burst)
    assert set(accepted) <= set(rows)
    jobs = [stack.wait_for_end(job_id, 300) for job_id in rows]  # every stored row runs, answered or not
    for job in jobs:
        stack.assert_succeeded_once(job)


def test_database_connections_terminated_mid_run(stack, tiny_model, fault_dataset):
    job_id = stack.submit(job_spec(tiny_model, fault_dataset))
    statuses: list[int | str] = []  # a status code, or the name of a transport error
    stop = threading.Event()

    def poll() -> None:
        with stack.client() as client:
            while not stop.is_set():
                for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events"):
                    try:
                        statuses.append(client.get(path).status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(type(exc).__name__)
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stack.running_attempt(job_id, 1)
    database = stack.database_url.rsplit("/", 1)[1]
    terminated = 0
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        for _ in range(6):
            time.sleep(1)
            terminated += len(
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                    "pg_backend_pid()",
                    (database,),
                ).fetchall()
            )
    job = stack.wait_for_end(job_id)
    stop.set()
    poller.join()
    assert terminated >= 6, terminated  # the API's, the workers' and the test's connections, again and again
    stack.assert_succeeded_once(job)
    failed = [code for code in statuses if not isinstance(code, int) or code >= 500]
    assert len(statuses) > 100 and not failed, (len(statuses), failed)


def test_paused_worker_is_superseded_and_its_stale_process_exits_without_writing(stack, tiny_model, fault_dataset):
    with ProcessWatcher(stack) as watcher:
        spec = job_spec(tiny_model, fault_dataset, max_steps=160)
        job_id, first, _ = start_checkpointed_job(stack, watcher, spec)
        paused = stack.worker_of(first["worker"])
        stale_pid = stack.child_pid(job_id, 1)
        paused.signal_group(signal.SIGSTOP)
        second = stack.running_attempt(job_id, 2, timeout_seconds=60)
        stack.wait_for_checkpoint(job_id, 2)  # the new attempt is training while the old one is frozen
        resumed_at = time.monotonic()
        paused.signal_group(signal.SIGCONT)
        wait_until(lambda: not _running(stale_pid), STALE_EXIT_SECONDS, "the stale training process to exit")
        job = stack.wait_for_end(job_id)
    stack.assert_succeeded_once(job)
    assert [a["outcome"] for a in job["attempts"]] == ["lease_expired", "succeeded"]
    assert second["worker"] != first["worker"]
    events = stack.events(job_id)
    took_over = next(
        e["seq"]
        for e in events
        if e["kind"] == "state" and e["data"].get("attempt") == 2 and e["data"]["status"] == "running"
    )
    assert not [e for e in events if e["data"].get("attempt") == 1 and e["seq"] > took_over]
    paused.wait_for_line("lost its lease; stopped without writing", 30)
    # A process resumed from SIGSTOP runs until its next lease check; nothing else may ever overlap.
    assert all(resumed_at <= at <= resumed_at + STALE_EXIT_SECONDS for at, *_ in watcher.overlaps), watcher.overlaps


def test_sigterm_drains_the_job_to_a_checkpoint_and_it_finishes_elsewhere(stack, tiny_model, fault_dataset):
    with ProcessWatcher(stack) as watcher:
        job_id, first, periodic = start_checkpointed_job(stack, watcher, job_spec(tiny_model, fault_dataset))
        draining = stack.worker_of(first["worker"])
        draining.process.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
        assert draining.process.wait(timeout=60) == 0
        job = stack.wait_for_end(job_id)
    stack.assert_succeeded_once(job)
    drained, finished = job["attempts"]
    assert drained["outcome"] == "drained" and finished["worker"] != drained["worker"]
    drain_checkpoint = [e for e in stack.events(job_id) if e["kind"] == "checkpoint" and e["data"]["attempt"] == 1][-1]
    assert finished["resumed_from_step"] == drain_checkpoint["data"]["step"] >= periodic["data"]["step"]
    assert not watcher.overlaps


def test_a_second_sigterm_stops_the_job_at_once_and_it_is_still_requeued(stack, tiny_model, fault_dataset):
    with ProcessWatcher(stack) as watcher:
        job_id, first, periodic = start_checkpointed_job(stack, watcher, job_spec(tiny_model, fault_dataset))
        stopping = stack.worker_of(first["worker"])
        stopping.process.send_signal(signal.SIGTERM)
        stopping.wait_for_line("draining the running job", 10)  # two signals sent at once would merge into one
        stopping.process.send_signal(signal.SIGTERM)
        assert stopping.process.wait(timeout=60) == 0
        job = stack.wait_for_end(job_id)
    stack.assert_succeeded_once(job)
    stopped, finished = job["attempts"]
    assert stopped["outcome"] == "drained" and finished["worker"] != stopped["worker"]
    # Stopped at once, or drained if its step ended first: either way it resumed from a stored checkpoint.
    assert finished["resumed_from_step"] >= periodic["data"]["step"] > 0
    assert any("stopping the running job now" in line for line in stopping.lines)
    assert not watcher.overlaps
