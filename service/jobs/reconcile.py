"""The reconciler: what keeps every accepted job moving when workers, the broker or the API are lost.

One pass:
  1. attempts whose lease expired (a worker killed, paused, partitioned, or its machine gone) end as
     `lease_expired`; their job goes back to the queue as a new attempt, which resumes from the last complete
     checkpoint on whichever worker claims it, or fails with `attempts_exhausted` once max_attempts have run;
  2. jobs queued for longer than the grace period with no message for them in the broker (Redis restarted
     empty, the API killed between its commit and its send) are sent again; claims are guarded, so a message
     sent twice still starts the job once;
  3. GPUs whose worker stopped heartbeating are forgotten, so planning counts live GPUs only.

It runs in every worker process (worker/maintenance.py), every `reconcile_interval_seconds`. Many copies at
once are safe: each step locks the rows it acts on with FOR UPDATE SKIP LOCKED and every change is a guarded
UPDATE. Why the workers and not the API: a job can only make progress where a worker is alive, every worker
is already a long-lived process next to the jobs, and nothing else has to be deployed or kept alive for it;
the API stays stateless (planning itself ignores GPUs with a stale heartbeat, so it needs no reconciler).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from domain.states import JobStatus
from service.db import in_transaction
from service.gpus import gpu_expiry
from service.idempotency import repository as idempotency
from service.jobs import attempts, repository
from service.queue import enqueue_job, pending_job_ids
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    requeued: list[str] = field(default_factory=list)  # expired leases handed to a new attempt
    ended: list[str] = field(default_factory=list)  # expired leases whose job failed or was cancelled instead
    resent: list[str] = field(default_factory=list)  # queued jobs whose message was sent again
    expired_gpus: int = 0


def reconcile(settings: Settings) -> ReconcileReport:
    report = ReconcileReport()
    _release_expired_leases(settings, report)
    _resend_lost_messages(settings, report)
    report.expired_gpus = in_transaction(
        lambda session: repository.expire_gpus(session, attempts.database_now(session) - gpu_expiry(settings))
    )
    return report


def _release_expired_leases(settings: Settings, report: ReconcileReport) -> None:
    def release_all(session) -> list[tuple[str, JobStatus]]:
        released = []
        for fence in attempts.expired_leases(session):
            status = attempts.release(
                session,
                fence,
                "lease_expired",
                f"lease of attempt {fence.number} expired",
                settings.max_attempts,
                only_if_lease_expired=True,
            )
            if status is not None:
                released.append((fence.job_id, status))
        return released

    for job_id, status in in_transaction(release_all):
        log.warning("job %s: lease expired; now %s", job_id, status.value)
        if status is JobStatus.queued:
            enqueue_job(job_id, settings)
            report.requeued.append(job_id)
        else:
            report.ended.append(job_id)


def _resend_lost_messages(settings: Settings, report: ReconcileReport) -> None:
    waiting = pending_job_ids(settings)  # read before the scan: a message sent after it only adds a duplicate
    stale = in_transaction(lambda session: attempts.claim_stale_queued(session, settings.requeue_grace_seconds))
    for job_id in stale:
        if waiting is None or job_id not in waiting:
            log.warning("job %s: queued with no message in the broker; sending it again", job_id)
            enqueue_job(job_id, settings)
            report.resent.append(job_id)


PRUNE_BATCH_ROWS = 10_000  # per transaction, so pruning never holds locks on many rows for long


def prune_progress_events(settings: Settings) -> int:
    """Delete the progress events of jobs that ended more than `progress_event_retention_days` ago, in batches;
    their state changes and checkpoints stay. Returns how many were deleted."""
    if not settings.progress_event_retention_days:
        return 0
    retention = timedelta(days=settings.progress_event_retention_days)

    def prune_batch(session) -> int:
        return repository.delete_progress_events(session, attempts.database_now(session) - retention, PRUNE_BATCH_ROWS)

    return _in_batches(prune_batch)


def prune_idempotency_keys(settings: Settings) -> int:
    """Delete the Idempotency-Keys older than `idempotency_key_hours`, in batches; how many went. A key already
    past its time is treated as new by the API (service/idempotency/repository.py), pruned or not."""
    kept_for = timedelta(hours=settings.idempotency_key_hours)

    def prune_batch(session) -> int:
        return idempotency.delete_created_before(session, attempts.database_now(session) - kept_for, PRUNE_BATCH_ROWS)

    return _in_batches(prune_batch)


def _in_batches(prune_batch) -> int:
    deleted = batch = in_transaction(prune_batch)
    while batch == PRUNE_BATCH_ROWS:
        batch = in_transaction(prune_batch)
        deleted += batch
    return deleted
