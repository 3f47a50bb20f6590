"""A job that ran out of memory anyway: re-planned (planner/recovery.py) and resumed from its last checkpoint as a
new attempt, at most Settings.max_oom_recoveries times; then, or when no cheaper change is left, it fails with
out_of_memory and the figures: the step, the measured peak and what the plan predicted.

The worker's parent process calls this with the training process's last message (worker/execution.py); it runs
in one transaction that holds the job's row, so the recovery, its event and the hand-back to the queue happen
together or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from domain.spec import JobSpec
from domain.states import JobStatus
from planner.recovery import Recovery, recover
from planner.scope import PlanRefused
from service.base_models import model_shape
from service.errors import ProblemError
from service.jobs import attempts, repository
from service.jobs.attempts import Fence
from service.models import Job
from service.settings import Settings

GIB = 2**30


def after_out_of_memory(
    session: Session, fence: Fence, failure: dict[str, Any], settings: Settings
) -> JobStatus | None:
    """queued again with the recovered spec, or failed; None if the attempt was superseded meanwhile.
    `failure`: the training process's out_of_memory message (step, device, measured_peak_bytes)."""
    job = attempts.running_job(session, fence)
    if job is None:
        return None
    if job.oom_recoveries >= settings.max_oom_recoveries:
        used = f"{job.oom_recoveries} of {settings.max_oom_recoveries} out-of-memory recoveries used"
        return _fail(session, fence, job, failure, used)
    try:
        recovery = _replan(job, failure)
    except (PlanRefused, ProblemError) as exc:  # the model's config is gone or no longer plannable
        return _fail(session, fence, job, failure, f"it could not be re-planned: {exc}")
    if recovery is None:
        return _fail(session, fence, job, failure, "no cheaper change keeps its effective batch")
    attempts.change_spec(
        session,
        job,
        recovery.spec.model_dump(mode="json"),
        recovery.plan.model_dump(mode="json"),
        recovery.plan.peak_vram_bytes,
    )
    repository.add_event(session, job.id, "oom_recovered", _event(job, failure, recovery, settings))
    return attempts.release(
        session, fence, "out_of_memory", f"re-planned: {recovery.description}", settings.max_attempts
    )


def _replan(job: Job, failure: dict[str, Any]) -> Recovery | None:
    spec = JobSpec.model_validate(job.spec)
    shape = model_shape(spec.base_model, Path(job.base_model_path) / "config.json")
    on_device = failure.get("device") == "cuda"  # a CPU's resident peak says nothing about a GPU prediction
    return recover(
        spec,
        shape,
        job.plan.get("gpu_memory_bytes"),
        failure.get("measured_peak_bytes") if on_device else None,
        job.predicted_peak_bytes,
    )


def _event(job: Job, failure: dict[str, Any], recovery: Recovery, settings: Settings) -> dict[str, Any]:
    return {
        "message": f"ran out of memory at step {failure.get('step')}; re-planned: {recovery.description}",
        "attempt": job.attempt,
        "recovery": job.oom_recoveries + 1,
        "max_recoveries": settings.max_oom_recoveries,
        "step": failure.get("step"),
        "device": failure.get("device"),
        "measured_peak_bytes": failure.get("measured_peak_bytes"),
        "predicted_peak_bytes_before": job.predicted_peak_bytes,
        "changes": recovery.changes,
        "plan": {
            "peak_vram_bytes": recovery.plan.peak_vram_bytes,
            "peak_phase": recovery.plan.peak_phase,
            "gpu_memory_bytes": recovery.plan.gpu_memory_bytes,
            "fits": recovery.plan.fits,
        },
    }


def _fail(session: Session, fence: Fence, job: Job, failure: dict[str, Any], why: str) -> JobStatus | None:
    message = f"{failure['message']}; {_figures(job, failure)}; {why}"
    if not attempts.finish(
        session, fence, JobStatus.failed, "failed", error_code="out_of_memory", error_message=message
    ):
        return None
    return JobStatus.failed


def _figures(job: Job, failure: dict[str, Any]) -> str:
    measured = failure.get("measured_peak_bytes")
    where = "device peak" if failure.get("device") == "cuda" else "resident peak"
    text = f"measured {where} {measured / GIB:.2f} GiB" if measured else "no peak measured"
    text += f", planned peak {job.predicted_peak_bytes / GIB:.2f} GiB"
    gpu = job.plan.get("gpu_memory_bytes")
    return text + (f" of a {gpu / GIB:.2f} GiB GPU" if gpu else "")
