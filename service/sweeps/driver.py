"""The sweep driver: one round per active sweep, run by every worker's maintenance loop (worker/maintenance.py).

A round, with the sweep's row locked (FOR UPDATE SKIP LOCKED: two workers never advance one sweep at once):
  1. trials follow their jobs: a succeeded job completes its trial with the metric's last value, a failed one
     fails it, a cancelled one prunes it; a running job's new intermediate values go to optuna, and when its
     pruner says so the job is cancelled with the reason;
  2. while fewer than `parallelism` trials have an active job and fewer than `n_trials` were asked, optuna asks;
     each trial is submitted exactly as POST /v1/jobs submits a job, planned first: one that does not fit (or
     whose configuration is invalid) is pruned with the reason and never queued;
  3. a sweep whose trials have all finished, and been told to optuna, ends.
The rows are the truth and optuna follows: outcomes are told after the round commits, and again by any later
round that finds optuna behind (a restart in between). A trial asked but never given a row (a round that died
after optuna's ask) is taken up by the next round instead of asking another, so restarts never lose or add one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from domain.errors import DomainError
from domain.states import JobStatus
from service.db import in_transaction
from service.errors import DoesNotFit, QuotaExceeded
from service.jobs import service as jobs
from service.models import Sweep, SweepTrial, utcnow
from service.queue import enqueue_job
from service.settings import Settings
from service.sweeps import repository
from service.sweeps.request import PROGRESS_KEY, InvalidTrial, SweepRequest, trial_spec
from service.sweeps.service import FINISHED_TRIAL_STATES as FINISHED
from service.sweeps.service import cancel_trial_job
from service.tenancy.keys import Caller

log = logging.getLogger(__name__)


@dataclass
class Round:
    """One sweep's round: what it works with, and what is left for after its commit."""

    session: Session
    settings: Settings
    sweep: Sweep
    request: SweepRequest
    study: Any  # service.sweeps.study.SweepStudy, imported lazily
    owner: Caller  # the trials' jobs are the sweep creator's
    queued: list[str] = field(default_factory=list)  # job ids to send once the round has committed
    finished_rows: list[SweepTrial] = field(default_factory=list)  # told to optuna after the commit


def advance_sweeps(settings: Settings) -> int:
    """A round of every active sweep; how many advanced. One sweep's failure does not stop the others'."""
    sweep_ids = in_transaction(repository.active_sweep_ids, settings)
    if not sweep_ids:
        return 0  # optuna is not even imported
    from service.sweeps import study as studies

    advanced = 0
    for sweep_id in sweep_ids:
        try:
            done = in_transaction(lambda session, sweep_id=sweep_id: _round(session, settings, sweep_id), settings)
            if done is not None:
                advanced += 1
                studies.tell_outcomes(done.study, done.finished_rows)
                _send(done)
        except Exception:
            log.exception("sweep %s: round failed; the next one tries again", sweep_id)
    return advanced


def _send(done: Round) -> None:
    for job_id in done.queued:
        try:
            enqueue_job(job_id, done.settings)
        except Exception as exc:  # the broker is down: the reconciler sends it after the grace period
            log.warning("sweep %s: job %s queued but not sent (%s)", done.sweep.id, job_id, exc)


def _round(session: Session, settings: Settings, sweep_id: str) -> Round | None:
    from service.sweeps import study as studies

    sweep = repository.lock_active_sweep(session, sweep_id)
    if sweep is None:
        return None
    request = SweepRequest.model_validate(sweep.request)
    owner = Caller(key_id=sweep.created_by_key_id or "", tenant_id=sweep.tenant_id, admin=False)
    done = Round(session, settings, sweep, request, studies.open_study(settings, sweep, request), owner)
    rows = repository.trials_with_jobs(session, sweep.id)
    studies.tell_outcomes(done.study, [row.trial for row in rows])  # catching up on a round that died after commit
    if _finish_if_done(done, [row.trial for row in rows]):
        return done
    for row in rows:
        _follow_job(done, row)
    if sweep.status == "running":
        _ask_trials(done, rows)
    session.flush()
    done.finished_rows = [trial for trial in repository.trials(session, sweep.id) if trial.state in FINISHED]
    return done


def _finish_if_done(done: Round, trials: list[SweepTrial]) -> bool:
    """A running sweep ends once all n_trials have finished and optuna has every outcome; a cancelling one once
    optuna has them (the cancel itself cancelled the trials' jobs)."""
    from service.sweeps import study as studies

    sweep = done.sweep
    if any(trial.state not in FINISHED for trial in trials):
        return False
    if sweep.status == "running" and (len(trials) < done.request.n_trials or studies.running(done.study)):
        return False
    if sweep.status == "cancelling":
        studies.tell_orphans_pruned(done.study, {trial.number for trial in trials})
        sweep.status = "cancelled"
    else:
        sweep.status = "succeeded" if any(trial.state == "complete" for trial in trials) else "failed"
    sweep.finished_at = sweep.updated_at = utcnow()
    return True


def _follow_job(done: Round, row: repository.TrialWithJob) -> None:
    trial = row.trial
    if trial.state in FINISHED or row.job_status is None:
        return
    status, metric = JobStatus(row.job_status), done.request.metric
    if status is JobStatus.succeeded:
        value = (row.job_progress or {}).get(PROGRESS_KEY[metric])
        if value is None or not math.isfinite(value):
            trial.state, trial.pruned_reason = "failed", f"the job reported no finite {metric}"
        else:
            trial.state, trial.value = "complete", float(value)
    elif status is JobStatus.failed:
        trial.state = "failed"
    elif status is JobStatus.cancelled:  # not by the pruner (that trial is pruned already): by its owner
        trial.state, trial.pruned_reason = "pruned", "the job was cancelled"
    else:
        trial.state = "queued" if status is JobStatus.queued else "running"
        _report_progress(done, trial)


def _report_progress(done: Round, trial: SweepTrial) -> None:
    """New intermediate values to optuna; the job cancelled, with the reason, when its pruner says so."""
    from service.sweeps import study as studies

    events = repository.progress_since(done.session, trial.job_id, trial.last_event_seq)
    if not events:
        return
    trial.last_event_seq = events[-1][0]
    key, pruner = PROGRESS_KEY[done.request.metric], done.request.pruner
    points = [(int(data["step"]), float(data[key])) for _, data in events if data.get(key) is not None]
    if not points or trial.number not in studies.running(done.study):
        return
    last = events[-1][1]
    finished_training = last.get("total_steps") is not None and int(last["step"]) >= int(last["total_steps"])
    flagged = studies.report(done.study, trial.number, points)
    # Past its last step a trial has nothing left to save by stopping: it completes with its value.
    if flagged is not None and not finished_training:
        step, value = flagged
        threshold = "median" if pruner.type == "median" else f"{pruner.percentile:g}th percentile"
        reason = (
            f"pruned by optuna's {pruner.type} pruner at step {step}: {done.request.metric} {value:.4g} is worse "
            f"than the completed trials' {threshold} at that step"
        )
        if cancel_trial_job(done.session, trial, done.owner, reason):
            trial.state, trial.pruned_reason = "pruned", reason


def _ask_trials(done: Round, rows: list[repository.TrialWithJob]) -> None:
    """Fill the free slots: first with trials asked but never stored (a round died after optuna's ask)."""
    from service.sweeps import study as studies

    active = sum(1 for row in rows if row.job_status is not None and not JobStatus(row.job_status).is_terminal)
    known = {row.trial.number for row in rows}
    orphans = [(n, frozen.params) for n, frozen in sorted(studies.running(done.study).items()) if n not in known]
    while active < done.request.parallelism:
        if orphans:
            number, params = orphans.pop(0)
        elif studies.asked_count(done.study) < done.request.n_trials:
            number, params = studies.ask(done.study)
        else:
            return
        trial = _submit_trial(done, number, params)
        if trial is None:  # the tenant's quota is full: this trial waits for a later round
            return
        if trial.job_id is not None:
            active += 1
            done.queued.append(trial.job_id)


def _submit_trial(done: Round, number: int, params: dict[str, Any]) -> SweepTrial | None:
    """The trial as a job, planned as POST /v1/jobs plans one; pruned unrun when it cannot be a job."""
    trial = SweepTrial(sweep_id=done.sweep.id, number=number, params=params, state="queued", last_event_seq=0)
    try:
        spec = trial_spec(done.request.spec, params, done.sweep.id, number)
        with done.session.begin_nested():  # a refused submission leaves nothing behind
            job = jobs.submit_job(done.session, done.settings, spec, done.owner)
        trial.job_id, trial.predicted_peak_bytes = job.id, job.predicted_peak_bytes
    except InvalidTrial as error:
        trial.state, trial.pruned_reason = "pruned", f"invalid configuration: {error}"
    except DoesNotFit as error:
        trial.state, trial.pruned_reason = "pruned", f"does not fit: {error.detail}"
        trial.predicted_peak_bytes = (error.extra.get("plan") or {}).get("peak_vram_bytes")
    except QuotaExceeded as error:
        log.info("sweep %s: trial %d waits: %s", done.sweep.id, number, error.detail)
        return None
    except DomainError as error:
        if error.retryable:
            raise
        trial.state, trial.pruned_reason = "pruned", f"{error.code}: {error.detail}"
    return repository.add_trial(done.session, trial)
