"""Creating, reading and cancelling sweeps: the domain operations behind /v1/sweeps. None of them imports optuna:
the rows say what each trial became, and the driver (service/sweeps/driver.py) tells optuna."""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from domain.states import JobStatus
from service.base_models import resolve_base_model_dir
from service.dataset_refs import resolve_dataset
from service.errors import InvalidCursor, InvalidTransition, SweepFinished, SweepNotFound
from service.jobs import service as jobs
from service.jobs.service import ID_PATTERN, new_id
from service.models import Sweep, SweepTrial, utcnow
from service.settings import Settings
from service.sweeps import repository
from service.sweeps.request import MAX_SEED, SweepRequest
from service.tenancy.keys import Caller

FINISHED_TRIAL_STATES = frozenset({"complete", "pruned", "failed"})
SWEEP_CANCELLED = "the sweep was cancelled"


def create_sweep(session: Session, settings: Settings, request: SweepRequest, caller: Caller) -> tuple[Sweep, list]:
    """Store the sweep as running; its first round (a worker's driver) creates the study and queues trials.
    The base model and datasets are checked here, once, so a sweep whose every trial would fail is refused."""
    resolve_base_model_dir(request.spec.base_model, settings.model_root_dirs)
    for ref in (request.spec.dataset, request.spec.validation_dataset):
        if ref is not None:
            resolve_dataset(session, settings, ref, caller.tenant_id, request.spec.dataset_format)
    if request.sampler.seed is None:  # drawn once and stored: every later round draws the same trials
        sampler = request.sampler.model_copy(update={"seed": secrets.randbelow(MAX_SEED)})
        request = request.model_copy(update={"sampler": sampler})
    sweep_id = new_id("swp")
    sweep = Sweep(
        id=sweep_id,
        tenant_id=caller.tenant_id,
        created_by_key_id=caller.key_id,
        status="running",
        request=request.model_dump(mode="json", exclude_unset=True),  # as asked: no defaults turned into choices
        study_name=f"ftjobs-{sweep_id}",
    )
    return repository.add_sweep(session, sweep), []


def load_sweep(session: Session, sweep_id: str, caller: Caller) -> Sweep:
    """The sweep if the caller may see it: another tenant's is as missing as none."""
    sweep = repository.get_sweep(session, sweep_id, caller.tenant_scope) if ID_PATTERN.fullmatch(sweep_id) else None
    if sweep is None:
        raise SweepNotFound(f"no sweep {sweep_id!r}")
    return sweep


def list_sweeps(
    session: Session, limit: int, after: str | None, caller: Caller
) -> tuple[list[Sweep], dict[str, dict[str, int]], bool]:
    """A page of the caller's sweeps (an admin's: every tenant's), newest first, continuing after the sweep
    `after`; each sweep's trial counts by state; whether more follow."""
    before = None
    if after is not None:
        before = repository.get_sweep(session, after, caller.tenant_scope) if ID_PATTERN.fullmatch(after) else None
        if before is None:
            raise InvalidCursor(f"no sweep {after!r} to continue after")
    page = repository.list_sweeps(session, caller.tenant_scope, limit + 1, before)
    shown = page[:limit]
    return shown, repository.trial_counts(session, [sweep.id for sweep in shown]), len(page) > limit


def get_sweep(session: Session, sweep_id: str, caller: Caller) -> tuple[Sweep, list[SweepTrial]]:
    sweep = load_sweep(session, sweep_id, caller)
    return sweep, repository.trials(session, sweep.id)


def cancel_sweep(session: Session, sweep_id: str, caller: Caller) -> tuple[Sweep, list[SweepTrial]]:
    """Cancel every trial's active job and stop asking; the driver then tells optuna and ends it as cancelled."""
    found = repository.lock_sweep(session, sweep_id, caller.tenant_scope) if ID_PATTERN.fullmatch(sweep_id) else None
    if found is None:
        raise SweepNotFound(f"no sweep {sweep_id!r}")
    if found.status not in repository.ACTIVE:
        raise SweepFinished(f"sweep {sweep_id} is {found.status}")
    found.status, found.updated_at = "cancelling", utcnow()
    owner = Caller(key_id=caller.key_id, tenant_id=found.tenant_id, admin=False)
    for row in repository.trials_with_jobs(session, found.id):
        if row.trial.state in FINISHED_TRIAL_STATES:
            continue
        if row.job_status is not None and not JobStatus(row.job_status).is_terminal:
            cancel_trial_job(session, row.trial, owner, SWEEP_CANCELLED)
        row.trial.state, row.trial.pruned_reason = "pruned", SWEEP_CANCELLED
    session.flush()
    return found, repository.trials(session, found.id)


def cancel_trial_job(session: Session, trial: SweepTrial, owner: Caller, reason: str) -> bool:
    """Cancel the trial's job with the reason on its state event; False for a job that has just ended, which keeps
    its outcome (the next round records it)."""
    session.flush()  # cancel_job expires the session's objects: what this unit changed must be written first
    try:
        jobs.cancel_job(session, trial.job_id, owner, reason=reason)
    except InvalidTransition:
        return False
    return True
