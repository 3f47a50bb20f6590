"""Running one job: claim it, train it in a child process, relay progress, honour cancels, record the outcome.

A child that dies without a result (a signal: the kernel's OOM killer, a SIGKILL) or fails with a retryable
error is replaced by a fresh one, up to Settings.max_attempts in all; it trains in the same output dir, so it
resumes from the last checkpoint the previous one wrote (worker/training/checkpoint.py).

Plain code with no Celery in it: the task in worker/tasks.py is a two-line adapter around execute_job.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.db import transaction
from service.jobs import repository
from service.jobs.states import JobStatus
from service.models import Job
from service.settings import Settings
from worker import metrics as worker_metrics
from worker.job_process import job_process_main

log = logging.getLogger(__name__)
TERMINATE_GRACE_SECONDS = 10


@dataclass(frozen=True)
class ClaimedJob:
    id: str
    spec: dict[str, Any]
    base_model_dir: str
    dataset_path: str
    predicted_peak_bytes: int


def claim(job_id: str, hostname: str) -> ClaimedJob | None:
    """The guarded queued→running UPDATE: whoever wins it runs the job; a redelivered message loses."""
    with transaction() as session:
        if not repository.transition(session, job_id, JobStatus.running, worker_hostname=hostname):
            return None
        job: Job = repository.get_job(session, job_id)
        return ClaimedJob(job.id, job.spec, job.base_model_path, job.dataset_path, job.predicted_peak_bytes)


def execute_job(job_id: str, settings: Settings, hostname: str) -> JobStatus | None:
    job = claim(job_id, hostname)
    if job is None:
        log.info("job %s is not queued any more; skipping this delivery", job_id)
        return None
    output_dir = settings.artifacts_dir / job.id
    output_dir.mkdir(parents=True, exist_ok=True)
    return _supervise(job, output_dir, settings.cancel_poll_seconds, settings.max_attempts)


def _supervise(job: ClaimedJob, output_dir: Path, cancel_poll_seconds: float, max_attempts: int) -> JobStatus:
    started = time.monotonic()
    worker_metrics.job_started(job.id, job.predicted_peak_bytes)
    for attempt in range(1, max_attempts + 1):
        process, outcome = _run_attempt(job, output_dir, cancel_poll_seconds)
        if attempt == max_attempts or not _retryable(job.id, outcome):
            break
        _reap(process)  # its exit code goes into the retry's reason
        _log_event(job.id, f"attempt {attempt + 1} of {max_attempts} after: {_failure(outcome, process.exitcode)[1]}")
    status = _record_outcome(job.id, outcome, process, output_dir)
    worker_metrics.job_finished(job.id, status.value, time.monotonic() - started, outcome.get("measured_peak_bytes"),
                                job.predicted_peak_bytes, outcome.get("code"))
    return status


def _run_attempt(job: ClaimedJob, output_dir: Path, cancel_poll_seconds: float) -> tuple[Any, dict[str, Any]]:
    """One training process for the job, from its start to its last message or its death."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=job_process_main, name=f"ftjobs-{job.id}", daemon=False,
                              args=(job.spec, job.base_model_dir, job.dataset_path, str(output_dir), child_end))
    process.start()
    child_end.close()
    with transaction() as session:
        repository.set_job_fields(session, job.id, child_pid=process.pid)
    _log_event(job.id, f"training process {process.pid} started")
    try:
        return process, _relay_until_done(job.id, process, parent_end, cancel_poll_seconds)
    finally:
        parent_end.close()


def _retryable(job_id: str, outcome: dict[str, Any]) -> bool:
    """Died without a result, or failed with an error that says running again could help; never when cancelling."""
    retryable = outcome["type"] == "crashed" or (outcome["type"] == "error" and outcome.get("retryable", False))
    return retryable and not _cancel_requested(job_id)


def _log_event(job_id: str, message: str) -> None:
    with transaction() as session:
        repository.add_event(session, job_id, "log", {"message": message})


def _relay_until_done(job_id: str, process, conn, cancel_poll_seconds: float) -> dict[str, Any]:
    next_cancel_check = 0.0
    while True:
        if conn.poll(cancel_poll_seconds):
            try:
                message = conn.recv()
            except EOFError:  # the child is gone without a last word
                return {"type": "crashed"}
            if message["type"] in ("result", "error"):
                return message
            _record_message(job_id, message)
        elif not process.is_alive():
            return {"type": "crashed"}
        if time.monotonic() >= next_cancel_check:
            next_cancel_check = time.monotonic() + cancel_poll_seconds
            if _cancel_requested(job_id):
                _stop(process)
                return {"type": "cancelled"}


def _record_message(job_id: str, message: dict[str, Any]) -> None:
    if message["type"] == "progress":
        _record_progress(job_id, message)
        return
    # "checkpoint" ({step, path}) and "log" ({message, ...}) become job events of that kind as they are.
    with transaction() as session:
        repository.add_event(session, job_id, message["type"], {k: v for k, v in message.items() if k != "type"})


def _record_progress(job_id: str, message: dict[str, Any]) -> None:
    progress = {key: value for key, value in message.items() if key != "type"}
    with transaction() as session:
        repository.record_progress(session, job_id, progress)
    worker_metrics.job_progress(job_id, progress)


def _cancel_requested(job_id: str) -> bool:
    with transaction() as session:
        return repository.current_status(session, job_id) is JobStatus.cancelling


def _stop(process) -> None:
    process.terminate()
    process.join(TERMINATE_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()


def _reap(process) -> None:
    process.join(TERMINATE_GRACE_SECONDS)
    if process.is_alive():
        _stop(process)


def _record_outcome(job_id: str, outcome: dict[str, Any], process, output_dir: Path) -> JobStatus:
    _reap(process)
    kind = outcome["type"]
    with transaction() as session:
        if kind == "result":
            artifacts = [{"name": name, "size_bytes": (output_dir / name).stat().st_size}
                         for name in outcome["artifacts"]]
            repository.transition(session, job_id, JobStatus.succeeded, artifacts=artifacts,
                                  measured_peak_bytes=outcome.get("measured_peak_bytes"))
            return JobStatus.succeeded
        if kind == "cancelled":
            repository.transition(session, job_id, JobStatus.cancelled)
            return JobStatus.cancelled
        if kind == "error" and outcome["code"] == "cancelled":
            repository.transition(session, job_id, JobStatus.cancelled)
            return JobStatus.cancelled
        code, message = _failure(outcome, process.exitcode)
        repository.transition(session, job_id, JobStatus.failed, error_code=code, error_message=message)
        return JobStatus.failed


def _failure(outcome: dict[str, Any], exitcode: int | None) -> tuple[str, str]:
    if outcome["type"] == "error":
        return outcome["code"], outcome["message"]
    # A child killed by the kernel's OOM killer (SIGKILL) leaves no message behind.
    return "training_crashed", f"the training process exited with code {exitcode} without a result"


def recover_orphans(hostname: str) -> list[str]:
    """Jobs this worker was running when it last died can never finish: fail them so nobody waits forever."""
    with transaction() as session:
        orphans = repository.jobs_running_on(session, hostname)
        for job_id in orphans:
            if repository.current_status(session, job_id) is JobStatus.cancelling:
                repository.transition(session, job_id, JobStatus.cancelled)
                continue
            repository.transition(session, job_id, JobStatus.failed, error_code="worker_lost",
                                  error_message=f"worker {hostname} stopped while the job was running; resubmit it")
    return orphans
