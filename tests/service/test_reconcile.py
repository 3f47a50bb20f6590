"""Attempts, fencing and the reconciler against the real PostgreSQL and Redis, one decision at a time."""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from domain.states import JobStatus
from service.db import get_engine, transaction
from service.gpus import live_gpus
from service.jobs import attempts, repository
from service.jobs.attempts import Fence
from service.jobs.reconcile import reconcile
from service.models import Job, RegisteredGpu, utcnow
from service.queue import enqueue_job, pending_job_ids
from service.settings import Settings


@pytest.fixture()
def own_queue(settings, redis_client):
    """Settings with a queue nobody consumes, so the test sees exactly the messages the reconciler sent. The
    reconciler acts on every job in the shared test database, so a test asks about its own job only: another
    test's leftover job may be acted on in the same pass (CI saw one resent here)."""
    isolated = settings.model_copy(
        update={"queue_name": f"reconcile-{uuid.uuid4().hex[:8]}", "max_attempts": 2, "requeue_grace_seconds": 5}
    )
    yield isolated
    redis_client.delete(isolated.queue_name)


@pytest.fixture()
def queued_job(store_queued_job, tiny_model, data_root):
    (data_root / "reconcile.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    job_id = store_queued_job(
        {
            "base_model": str(tiny_model),
            "dataset": {"path": "reconcile.jsonl"},
            "dataset_format": "text",
            "method": "lora",
            "training": {"max_steps": 1, "max_seq_length": 32},
        }
    )
    yield job_id
    # Ended, so the session worker's own reconciler never picks up what these tests left half-done.
    with transaction() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(["queued", "running"]))
            .values(status="cancelled", lease_expires_at=None)
        )


def expire_lease(job_id: str) -> None:
    with transaction() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def job(job_id: str) -> Job:
    with transaction() as session:
        return repository.get_job(session, job_id)


def test_an_expired_lease_is_requeued_as_a_new_attempt_and_then_runs_out(queued_job, own_queue):
    with transaction() as session:
        first = attempts.claim(session, queued_job, "w1@host", lease_seconds=60)
    assert first == Fence(queued_job, 1) and job(queued_job).lease_expires_at > utcnow()
    assert queued_job not in reconcile(own_queue).requeued  # a live lease is left alone

    expire_lease(queued_job)
    report = reconcile(own_queue)
    assert queued_job in report.requeued and queued_job in pending_job_ids(own_queue)
    stored = job(queued_job)
    assert stored.status == "queued" and stored.lease_expires_at is None
    assert [(a.number, a.outcome) for a in stored.attempts] == [(1, "lease_expired")]

    with transaction() as session:
        second = attempts.claim(session, queued_job, "w2@host", lease_seconds=60)
    assert second.number == 2
    expire_lease(queued_job)
    assert queued_job in reconcile(own_queue).ended  # max_attempts is 2
    stored = job(queued_job)
    assert stored.status == "failed" and stored.error_code == "attempts_exhausted"
    assert [(a.number, a.worker_hostname, a.outcome) for a in stored.attempts] == [
        (1, "w1@host", "lease_expired"),
        (2, "w2@host", "lease_expired"),
    ]


def test_a_worker_frozen_inside_a_transaction_loses_its_row_locks_and_then_its_job(queued_job, own_queue):
    """SIGSTOP between an UPDATE and its COMMIT: the reconciler skips locked rows, so without the idle timeout
    the frozen worker would keep its job for as long as it stays frozen."""
    worker_settings = own_queue.model_copy(update={"idle_in_transaction_seconds": 1})
    with transaction() as session:
        attempts.claim(session, queued_job, "w1@host", lease_seconds=60)
    expire_lease(queued_job)
    frozen = get_engine(worker_settings).connect()
    frozen.begin()
    frozen.execute(select(Job.id).where(Job.id == queued_job).with_for_update())
    assert queued_job not in reconcile(own_queue).requeued  # locked: another reconciler might be handling it

    time.sleep(1.5)
    assert queued_job in reconcile(own_queue).requeued
    with pytest.raises(DBAPIError, match="idle-in-transaction timeout"):
        frozen.execute(select(1))
    frozen.close()


def test_a_superseded_attempt_can_write_nothing(queued_job, own_queue):
    with transaction() as session:
        stale = attempts.claim(session, queued_job, "w1@host", lease_seconds=60)
    expire_lease(queued_job)
    reconcile(own_queue)
    with transaction() as session:
        current = attempts.claim(session, queued_job, "w2@host", lease_seconds=60)
        assert attempts.record_checkpoint(session, current, 5, "jobs/x/checkpoints/a2-step-000005")
    events_before = len(_events(queued_job))
    with transaction() as session:
        assert not attempts.renew_lease(session, stale, 60)
        assert not attempts.record_progress(session, stale, {"step": 99})
        assert not attempts.add_event(session, stale, "log", {"message": "stale"})
        assert not attempts.record_checkpoint(session, stale, 10, "jobs/x/checkpoints/a1-step-000010")
        assert not attempts.finish(session, stale, JobStatus.succeeded, "succeeded")
        assert attempts.status_of(session, stale) is None
        assert attempts.release(session, stale, "crashed", "stale", max_attempts=5) is None
    stored = job(queued_job)
    assert stored.status == "running" and stored.attempt == 2 and stored.progress is None
    assert len(_events(queued_job)) == events_before
    with transaction() as session:
        assert attempts.latest_checkpoint(session, queued_job).storage_key.endswith("a2-step-000005")
        assert attempts.status_of(session, current) is JobStatus.running


def test_a_queued_job_without_a_message_is_sent_again_after_the_grace(queued_job, own_queue):
    assert queued_job not in reconcile(own_queue).resent  # within the grace period
    with transaction() as session:
        session.execute(update(Job).where(Job.id == queued_job).values(queued_at=utcnow() - timedelta(seconds=30)))
    enqueue_job(queued_job, own_queue)  # its message is still waiting: nothing to re-send
    assert queued_job not in reconcile(own_queue).resent
    assert job(queued_job).queued_at > utcnow() - timedelta(seconds=5)  # looked at: the grace restarts

    with transaction() as session:
        session.execute(update(Job).where(Job.id == queued_job).values(queued_at=utcnow() - timedelta(seconds=30)))
    import redis

    redis.Redis.from_url(own_queue.redis_url).delete(own_queue.queue_name)  # Redis restarted empty
    assert queued_job in reconcile(own_queue).resent
    assert queued_job in pending_job_ids(own_queue)


def test_gpus_of_a_silent_worker_stop_counting_and_are_expired(database, own_queue):
    # Silent for 30 s: past this test's expiry (its lease, 10 s), within the 60 s of the workers other tests
    # run, whose reconcilers share this database: only this test's reconcile may expire the GPU.
    quick = own_queue.model_copy(update={"lease_seconds": 10.0, "reconcile_interval_seconds": 1.0})
    name = f"gone-{uuid.uuid4().hex[:6]}@host"
    with transaction() as session:
        repository.register_gpus(session, name, [(0, "H200", 141 * 2**30)])
    with transaction() as session:
        assert name in {g.worker_hostname for g in live_gpus(session, quick)}
        session.execute(
            update(RegisteredGpu)
            .where(RegisteredGpu.worker_hostname == name)
            .values(heartbeat_at=utcnow() - timedelta(seconds=30))
        )
    with transaction() as session:
        assert name not in {g.worker_hostname for g in live_gpus(session, quick)}
        assert name in {g.worker_hostname for g in live_gpus(session, own_queue)}  # the default 60 s: alive
    assert reconcile(quick).expired_gpus >= 1
    with transaction() as session:
        assert name not in {g.worker_hostname for g in repository.list_gpus(session)}


@pytest.mark.parametrize("lease, renew", [(10, 10), (10, 20), (10, 0), (0, None)])
def test_lease_settings_are_validated(lease, renew):
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings(lease_seconds=lease, lease_renew_seconds=renew)


def _events(job_id: str) -> list:
    with transaction() as session:
        return repository.list_events(session.connection(), job_id, after_seq=0, limit=10_000)


def test_progress_events_of_long_finished_jobs_are_pruned(store_queued_job, tiny_model, data_root, settings):
    from service.jobs.reconcile import prune_progress_events

    (data_root / "prune.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    spec = {
        "base_model": str(tiny_model),
        "dataset": {"path": "prune.jsonl"},
        "dataset_format": "text",
        "method": "lora",
        "training": {"max_steps": 1, "max_seq_length": 32},
    }
    old, recent, running = (store_queued_job(spec) for _ in range(3))
    with transaction() as session:
        for job_id, ended_days_ago in ((old, 31), (recent, 29), (running, None)):
            for step in range(3):
                repository.add_event(session, job_id, "progress", {"step": step})
            if ended_days_ago is not None:
                repository.transition(session, job_id, JobStatus.cancelled)
                repository.set_job_fields(session, job_id, finished_at=utcnow() - timedelta(days=ended_days_ago))

    kept = settings.model_copy(update={"progress_event_retention_days": 30})
    assert prune_progress_events(kept) >= 3
    assert prune_progress_events(kept) == 0  # nothing left to prune
    with transaction() as session:
        kinds = {
            job_id: [e.kind for e in repository.list_events(session.connection(), job_id, after_seq=0, limit=100)]
            for job_id in (old, recent, running)
        }
    assert kinds[old] == ["state", "state"]  # queued, cancelled: the state changes stay
    assert kinds[recent].count("progress") == 3 and kinds[running].count("progress") == 3
    assert prune_progress_events(settings.model_copy(update={"progress_event_retention_days": 0})) == 0
    with transaction() as session:
        repository.transition(session, running, JobStatus.cancelled)
