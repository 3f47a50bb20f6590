"""Every SQL statement about sweeps and their trials. Functions flush; callers commit."""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session

from service.jobs.repository import SEQ_MAX
from service.models import Job, JobEvent, Sweep, SweepTrial

ACTIVE = ("running", "cancelling")  # the statuses a driver advances


class TrialWithJob(NamedTuple):
    trial: SweepTrial
    job_status: str | None  # None: the trial never got a job (pruned before queueing)
    job_progress: dict[str, Any] | None


def add_sweep(session: Session, sweep: Sweep) -> Sweep:
    session.add(sweep)
    session.flush()
    return sweep


def get_sweep(session: Session, sweep_id: str, tenant_id: str | None) -> Sweep | None:
    query = select(Sweep).where(Sweep.id == sweep_id)
    if tenant_id is not None:
        query = query.where(Sweep.tenant_id == tenant_id)
    return session.scalar(query)


def list_sweeps(session: Session, tenant_id: str | None, limit: int, before: Sweep | None) -> list[Sweep]:
    """Newest first (created_at, then id), after `before` when given; one tenant's, or every tenant's (None)."""
    query = select(Sweep).order_by(Sweep.created_at.desc(), Sweep.id.desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(Sweep.tenant_id == tenant_id)
    if before is not None:
        query = query.where(tuple_(Sweep.created_at, Sweep.id) < tuple_(before.created_at, before.id))
    return list(session.scalars(query))


def trial_counts(session: Session, sweep_ids: list[str]) -> dict[str, dict[str, int]]:
    """Per sweep, how many trials are in each state: one grouped query for a whole page."""
    counts: dict[str, dict[str, int]] = {sweep_id: {} for sweep_id in sweep_ids}
    query = (
        select(SweepTrial.sweep_id, SweepTrial.state, func.count())
        .where(SweepTrial.sweep_id.in_(sweep_ids))
        .group_by(SweepTrial.sweep_id, SweepTrial.state)
    )
    for sweep_id, state, count in session.execute(query):
        counts[sweep_id][state] = count
    return counts


def active_sweep_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Sweep.id).where(Sweep.status.in_(ACTIVE)).order_by(Sweep.created_at)))


def lock_active_sweep(session: Session, sweep_id: str) -> Sweep | None:
    """The sweep, locked for this round; None when another driver holds it or it has ended."""
    query = select(Sweep).where(Sweep.id == sweep_id, Sweep.status.in_(ACTIVE))
    return session.scalar(query.with_for_update(skip_locked=True))


def lock_sweep(session: Session, sweep_id: str, tenant_id: str | None) -> Sweep | None:
    """For a cancel: waits for a driver's round to end, so the two never cross."""
    query = select(Sweep).where(Sweep.id == sweep_id)
    if tenant_id is not None:
        query = query.where(Sweep.tenant_id == tenant_id)
    return session.scalar(query.with_for_update())


def trials(session: Session, sweep_id: str) -> list[SweepTrial]:
    return list(session.scalars(select(SweepTrial).where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)))


def trials_with_jobs(session: Session, sweep_id: str) -> list[TrialWithJob]:
    query = (
        select(SweepTrial, Job.status, Job.progress)
        .outerjoin(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep_id)
        .order_by(SweepTrial.number)
    )
    return [TrialWithJob(*row) for row in session.execute(query)]


def add_trial(session: Session, trial: SweepTrial) -> SweepTrial:
    session.add(trial)
    session.flush()
    return trial


PROGRESS_BATCH = 1000  # events read per trial and round; the rest are read in the next


def progress_since(session: Session, job_id: str, after_seq: int) -> list[tuple[int, dict[str, Any]]]:
    """The job's progress events after `after_seq`, oldest first, as (seq, data): a range of ix_job_events_job_seq
    read in order, as service/jobs/repository.py reads a page of events."""
    query = (
        select(JobEvent.seq, JobEvent.data)
        .where(
            tuple_(JobEvent.job_id, JobEvent.seq) > tuple_(job_id, after_seq),
            tuple_(JobEvent.job_id, JobEvent.seq) <= tuple_(job_id, SEQ_MAX),
            JobEvent.kind == "progress",
        )
        .order_by(JobEvent.job_id, JobEvent.seq)
        .limit(PROGRESS_BATCH)
    )
    return [(seq, data) for seq, data in session.execute(query)]
