"""Every SQL statement about attempts, leases, fencing and checkpoints. Functions flush; callers commit.

A claim starts attempt N of a job: `jobs.attempt` becomes N and the job holds a lease until `lease_expires_at`.
Every later write of that attempt (lease renewals, progress, events, checkpoints, its outcome) is a guarded
UPDATE ... WHERE attempt = N, and it fails once the job has moved on to a newer attempt or out of `running`.
A successful guarded UPDATE also locks the job's row until the transaction ends, so the inserts that follow it
in the same transaction cannot race a takeover. Times come from the database's clock on PostgreSQL, so
workers on machines whose clocks disagree still agree on when a lease ran out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from domain.states import JobStatus
from service.calibration import repository as calibration
from service.jobs import repository
from service.models import Job, JobAttempt, JobCheckpoint, utcnow

ACTIVE = (JobStatus.running.value, JobStatus.cancelling.value)


@dataclass(frozen=True)
class Fence:
    """Who writes: attempt `number` of job `job_id`."""

    job_id: str
    number: int


def database_now(session: Session) -> datetime:
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))
    return utcnow()  # the embedded SQLite database has one machine, hence one clock


def claim(session: Session, job_id: str, hostname: str, lease_seconds: float) -> Fence | None:
    """queued -> running as a new attempt, or None if the job is not queued (a duplicate or stale message)."""
    now = database_now(session)
    number = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(
            status=JobStatus.running.value,
            attempt=Job.attempt + 1,
            worker_hostname=hostname,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            child_pid=None,
            updated_at=now,
            started_at=func.coalesce(Job.started_at, now),
        )
        .returning(Job.attempt)
    ).scalar_one_or_none()
    if number is None:
        return None
    latest = latest_checkpoint(session, job_id)
    resumed_from = latest.step if latest else None
    session.add(
        JobAttempt(
            job_id=job_id, number=number, worker_hostname=hostname, started_at=now, resumed_from_step=resumed_from
        )
    )
    repository.add_event(
        session,
        job_id,
        "state",
        {"status": JobStatus.running.value, "attempt": number, "worker": hostname, "resumed_from_step": resumed_from},
    )
    return Fence(job_id, number)


def hold(session: Session, fence: Fence, **fields: Any) -> bool:
    """True (and the row locked until commit) while `fence` is the job's running attempt; also sets `fields`."""
    result = session.execute(
        update(Job)
        .where(Job.id == fence.job_id, Job.attempt == fence.number, Job.status.in_(ACTIVE))
        .values(updated_at=utcnow(), **fields)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def renew_lease(session: Session, fence: Fence, lease_seconds: float) -> bool:
    return hold(session, fence, lease_expires_at=database_now(session) + timedelta(seconds=lease_seconds))


def status_of(session: Session, fence: Fence) -> JobStatus | None:
    """running or cancelling while `fence` is the job's running attempt, else None (it was superseded)."""
    status = session.scalar(
        select(Job.status).where(Job.id == fence.job_id, Job.attempt == fence.number, Job.status.in_(ACTIVE))
    )
    return JobStatus(status) if status else None


def record_progress(session: Session, fence: Fence, progress: dict[str, Any]) -> bool:
    if not hold(session, fence, progress=progress):
        return False
    repository.add_event(session, fence.job_id, "progress", {**progress, "attempt": fence.number})
    return True


def add_event(session: Session, fence: Fence, kind: str, data: dict[str, Any]) -> bool:
    if not hold(session, fence):
        return False
    repository.add_event(session, fence.job_id, kind, {**data, "attempt": fence.number})
    return True


def set_child_pid(session: Session, fence: Fence, pid: int) -> bool:
    if not hold(session, fence, child_pid=pid):
        return False
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == fence.job_id, JobAttempt.number == fence.number)
        .values(child_pid=pid)
    )
    return True


def end_attempt(session: Session, fence: Fence, outcome: str, detail: str | None = None) -> None:
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == fence.job_id, JobAttempt.number == fence.number, JobAttempt.ended_at.is_(None))
        .values(ended_at=database_now(session), outcome=outcome, detail=detail)
    )


def finish(
    session: Session,
    fence: Fence,
    to: JobStatus,
    outcome: str,
    *,
    measured: calibration.MeasuredPeak | None = None,
    **fields: Any,
) -> bool:
    """The attempt's own terminal outcome, fenced: a superseded attempt changes nothing. `measured`: a
    succeeded GPU job's peak, stored for the planner in the same transaction as the success."""
    if not repository.transition(
        session, fence.job_id, to, attempt=fence.number, event={"attempt": fence.number}, **fields
    ):
        return False
    end_attempt(session, fence, outcome, fields.get("error_message"))
    if measured is not None and to is JobStatus.succeeded:
        calibration.record(session, fence.job_id, measured)
    return True


def release(
    session: Session, fence: Fence, outcome: str, detail: str, max_attempts: int, *, only_if_lease_expired: bool = False
) -> JobStatus | None:
    """End the attempt and hand the job on: back to the queue, or cancelled if a cancel was asked, or failed
    with `attempts_exhausted` once `max_attempts` attempts have run. None if the attempt was superseded (or,
    with `only_if_lease_expired`, if its lease is still good): nothing changed."""
    query = select(Job.status, Job.oom_recoveries).where(
        Job.id == fence.job_id, Job.attempt == fence.number, Job.status.in_(ACTIVE)
    )
    if only_if_lease_expired:
        query = query.where(Job.lease_expires_at < database_now(session))
    found = session.execute(query.with_for_update()).one_or_none()
    if found is None:
        return None
    status, oom_recoveries = found
    end_attempt(session, fence, outcome, detail)
    if status == JobStatus.cancelling.value:
        target, fields = JobStatus.cancelled, {}
    elif fence.number - oom_recoveries >= max_attempts:  # the attempts out-of-memory recoveries started are extra
        target, fields = (
            JobStatus.failed,
            {
                "error_code": "attempts_exhausted",
                "error_message": f"{fence.number} of {max_attempts} attempts used; "
                f"the last ended with {outcome}: {detail}",
            },
        )
    else:
        target, fields = (
            JobStatus.queued,
            {"queued_at": database_now(session), "worker_hostname": None, "child_pid": None, "lease_expires_at": None},
        )
    repository.transition(
        session,
        fence.job_id,
        target,
        attempt=fence.number,
        event={"attempt": fence.number, "reason": outcome},
        **fields,
    )
    return target


def running_job(session: Session, fence: Fence) -> Job | None:
    """The job, its row locked until commit, while `fence` is its running attempt."""
    query = select(Job).where(Job.id == fence.job_id, Job.attempt == fence.number, Job.status.in_(ACTIVE))
    return session.scalar(query.with_for_update())


def change_spec(session: Session, job: Job, spec: dict[str, Any], plan: dict[str, Any], peak_bytes: int) -> None:
    """What the job's next attempts run, after an out-of-memory recovery; the first accepted spec is kept."""
    session.execute(
        update(Job)
        .where(Job.id == job.id)
        .values(
            requested_spec=func.coalesce(Job.requested_spec, Job.spec),
            spec=spec,
            plan=plan,
            predicted_peak_bytes=peak_bytes,
            oom_recoveries=Job.oom_recoveries + 1,
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )


def expired_leases(session: Session, limit: int = 100) -> list[Fence]:
    """Running attempts whose lease ran out. Rows another reconciler is handling right now are skipped."""
    query = (
        select(Job.id, Job.attempt)
        .where(Job.status.in_(ACTIVE), Job.lease_expires_at < database_now(session))
        .order_by(Job.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [Fence(job_id, number) for job_id, number in session.execute(query)]


def claim_stale_queued(session: Session, grace_seconds: float, limit: int = 500) -> list[str]:
    """Jobs queued for longer than the grace period; their queued_at restarts, so the next look is a grace later
    and concurrent reconcilers do not pick the same ones."""
    now = database_now(session)
    query = (
        select(Job.id)
        .where(Job.status == JobStatus.queued.value, Job.queued_at < now - timedelta(seconds=grace_seconds))
        .order_by(Job.queued_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    job_ids = list(session.scalars(query))
    if job_ids:
        session.execute(
            update(Job).where(Job.id.in_(job_ids)).values(queued_at=now).execution_options(synchronize_session=False)
        )
    return job_ids


def hold_in_queue(session: Session, job_id: str) -> bool:
    """A worker holds this queued job's message while it waits for devices: restart its queued_at so the
    reconciler does not re-send it (it does, a grace later, if the worker dies). False once it is not queued."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(queued_at=database_now(session))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)


def queued_devices(session: Session, job_id: str) -> int | None:
    """How many devices a queued job needs (resources.num_gpus), or None if it is not queued."""
    spec = session.scalar(select(Job.spec).where(Job.id == job_id, Job.status == JobStatus.queued.value))
    return None if spec is None else int(spec.get("resources", {}).get("num_gpus", 1))


def running_on(session: Session, hostname: str) -> list[Fence]:
    query = select(Job.id, Job.attempt).where(Job.worker_hostname == hostname, Job.status.in_(ACTIVE))
    return [Fence(job_id, number) for job_id, number in session.execute(query)]


# --- checkpoints --------------------------------------------------------------------------------------------


def record_checkpoint(
    session: Session, fence: Fence, step: int, storage_key: str, metrics: dict[str, Any] | None = None
) -> bool:
    if not hold(session, fence):
        return False
    session.add(
        JobCheckpoint(job_id=fence.job_id, attempt=fence.number, step=step, storage_key=storage_key, metrics=metrics)
    )
    repository.add_event(
        session,
        fence.job_id,
        "checkpoint",
        {"step": step, "path": storage_key, "attempt": fence.number, "metrics": metrics},
    )
    return True


def latest_checkpoint(session: Session, job_id: str) -> JobCheckpoint | None:
    query = (
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(JobCheckpoint.step.desc(), JobCheckpoint.attempt.desc())
        .limit(1)
    )
    return session.scalar(query)


def checkpoints_of(session: Session, job_id: str) -> list[JobCheckpoint]:
    """Newest first."""
    query = (
        select(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id)
        .order_by(JobCheckpoint.step.desc(), JobCheckpoint.attempt.desc())
    )
    return list(session.scalars(query))


def forget_checkpoints(session: Session, job_id: str, keys: list[str]) -> None:
    if keys:
        session.execute(
            delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.storage_key.in_(keys))
        )
