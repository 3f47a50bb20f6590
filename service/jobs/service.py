"""Creating, cancelling and reading jobs: the domain operations behind the routes."""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from planner import Plan
from planner.spec import JobSpec
from service.base_models import resolve_base_model_dir
from service.dataset_refs import local_dataset, resolve_dataset
from service.datasets import validate_dataset
from service.errors import (DoesNotFit, InvalidSpec, InvalidTransition, JobNotFound, UnsupportedNumGpus,
                            UnsupportedSharding)
from service.jobs import repository
from service.jobs.states import JobStatus
from service.models import Job, utcnow
from service.planning import plan_spec
from service.settings import Settings


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def submit_job(session: Session, settings: Settings, spec: JobSpec) -> Job:
    """Validate everything the worker will need, plan, and store the job as queued; refuse what cannot fit."""
    if spec.dataset is None:
        raise InvalidSpec("a job needs a dataset; only a plan may leave it out")
    _refuse_sharding_until_workers_run_it(spec)
    job_plan = plan_spec(session, settings, spec)
    if job_plan.fits is False:
        raise DoesNotFit(_does_not_fit_detail(job_plan), plan=job_plan.model_dump(mode="json"))
    model_dir = resolve_base_model_dir(spec.base_model)
    dataset_url = resolve_dataset(session, settings, spec.dataset)
    with local_dataset(dataset_url, settings) as dataset_path:
        validate_dataset(dataset_path, spec.dataset_format)
    resolved = _with_resolved_micro_batch(spec, job_plan)
    job = Job(id=new_id("job"), status=JobStatus.queued.value, spec=resolved.model_dump(mode="json"),
              plan=job_plan.model_dump(mode="json"), base_model_path=str(model_dir), dataset_url=dataset_url,
              predicted_peak_bytes=job_plan.peak_vram_bytes, queued_at=utcnow())
    return repository.add_job(session, job)


def _refuse_sharding_until_workers_run_it(spec: JobSpec) -> None:
    """The planner plans FSDP2 jobs (POST /v1/plans); the workers do not train them yet."""
    res = spec.resources
    if res.num_gpus > 1:
        raise UnsupportedNumGpus(f"resources.num_gpus {res.num_gpus}: multi-GPU training is not available on the "
                                 "workers yet; POST /v1/plans plans it per GPU")
    if res.sharding is not None or res.offload.value != "none":
        raise UnsupportedSharding("resources.sharding / offload: FSDP2 training is not available on the workers yet; "
                                  "POST /v1/plans plans it")


def _with_resolved_micro_batch(spec: JobSpec, job_plan: Plan) -> JobSpec:
    if spec.training.micro_batch_size != "auto":
        return spec
    training = spec.training.model_copy(update={"micro_batch_size": job_plan.micro_batch_size})
    return spec.model_copy(update={"training": training})


def _does_not_fit_detail(job_plan: Plan) -> str:
    gib = 1024**3
    detail = (f"predicted peak {job_plan.peak_vram_bytes / gib:.2f} GiB exceeds the "
              f"{job_plan.gpu_memory_bytes / gib:.2f} GiB GPU less its {job_plan.safety_margin_bytes / gib:.2f} GiB "
              "safety margin")
    if job_plan.suggestions:
        detail += f"; try: {job_plan.suggestions[0].description}"
    elif job_plan.min_gpu_memory_bytes:  # nothing fits: the plan's last reason names the smallest GPU / count
        detail += f"; {job_plan.reasons[-1]}"
    return detail


def load_job(session: Session, job_id: str) -> Job:
    job = repository.get_job(session, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


_CANCEL_TARGET = {JobStatus.queued: JobStatus.cancelled, JobStatus.running: JobStatus.cancelling}


def cancel_job(session: Session, job_id: str) -> Job:
    """Queued jobs end at once; running ones go to cancelling and their worker stops the training process."""
    job = load_job(session, job_id)
    for _ in range(2):  # a worker may claim the job between our read and our update: then try once more
        if job.status == JobStatus.cancelling.value:
            return job
        target = _CANCEL_TARGET.get(JobStatus(job.status))
        if target is None:
            break
        if repository.transition(session, job_id, target):
            return load_job_fresh(session, job_id)
        job = load_job_fresh(session, job_id)
    raise InvalidTransition(f"job {job_id} is {job.status} and cannot be cancelled")


def load_job_fresh(session: Session, job_id: str) -> Job:
    session.expire_all()
    return load_job(session, job_id)
