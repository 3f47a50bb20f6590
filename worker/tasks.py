"""Celery tasks: adapters that pass a job id to plain code."""

from __future__ import annotations

from service.broker import RUN_JOB_TASK
from service.queue import enqueue_job
from service.settings import get_settings
from worker.celery_app import DEVICE_SLOTS, app
from worker.execution import execute_job
from worker.shutdown import SHUTDOWN


@app.task(name=RUN_JOB_TASK, bind=True, ignore_result=True)
def run_job(self, job_id: str) -> None:
    if SHUTDOWN.drain.is_set():  # taken while this worker drains: unclaimed, so it goes back for another worker
        enqueue_job(job_id)
        return
    execute_job(job_id, get_settings(), self.request.hostname, SHUTDOWN, DEVICE_SLOTS)
