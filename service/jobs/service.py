"""Creating, cancelling and reading jobs: the domain operations behind the routes."""

from __future__ import annotations

import re
import secrets

from sqlalchemy import Connection, Row
from sqlalchemy.orm import Session

from domain.spec import JobSpec, Method, Offload
from domain.states import JobStatus
from planner import Plan
from service.base_models import resolve_base_model_dir
from service.dataset_refs import resolve_dataset
from service.errors import (
    ArtifactNotFound,
    DoesNotFit,
    InvalidCursor,
    InvalidSpec,
    InvalidTransition,
    JobNotFound,
    NotEnoughGpus,
    QuotaExceeded,
    UnsupportedSharding,
)
from service.gpus import live_gpus
from service.jobs import repository
from service.models import Job, utcnow
from service.planning import gpus_per_worker, plan_spec
from service.settings import Settings
from service.tenancy import repository as tenancy
from service.tenancy.keys import Caller

# Every id this service hands out; anything else cannot name a row, so it is not looked up at all.
ID_PATTERN = re.compile(r"[a-z]{2,8}_[0-9a-f]{24}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def submit_job(session: Session, settings: Settings, spec: JobSpec, caller: Caller) -> Job:
    """Validate everything the worker will need, plan, and store the job as queued for the caller's tenant;
    refuse what cannot fit or would pass the tenant's active-jobs quota."""
    if spec.dataset is None:
        raise InvalidSpec("a job needs a dataset; only a plan may leave it out")
    _refuse_what_workers_do_not_shard(spec)
    _refuse_more_gpus_than_a_worker_has(session, settings, spec)
    # Planning locates the model inside the model roots first: a name outside them is refused unread.
    job_plan = plan_spec(session, settings, spec, settings.model_root_dirs)
    if job_plan.fits is False:
        raise DoesNotFit(_does_not_fit_detail(job_plan), plan=job_plan.model_dump(mode="json"))
    model_dir = resolve_base_model_dir(spec.base_model, settings.model_root_dirs)
    dataset_url = resolve_dataset(session, settings, spec.dataset, caller.tenant_id, spec.dataset_format)
    validation_url = (
        resolve_dataset(session, settings, spec.validation_dataset, caller.tenant_id, spec.dataset_format)
        if spec.validation_dataset
        else None
    )
    _check_quota(session, settings, caller.tenant_id)
    resolved = _with_resolved_micro_batch(spec, job_plan)
    job = Job(
        id=new_id("job"),
        status=JobStatus.queued.value,
        spec=resolved.model_dump(mode="json"),
        plan=job_plan.model_dump(mode="json"),
        base_model_path=str(model_dir),
        dataset_url=dataset_url,
        validation_dataset_url=validation_url,
        predicted_peak_bytes=job_plan.peak_vram_bytes,
        queued_at=utcnow(),
        tenant_id=caller.tenant_id,
        created_by_key_id=caller.key_id,
    )
    return repository.add_job(session, job)


def _refuse_what_workers_do_not_shard(spec: JobSpec) -> None:
    """What POST /v1/plans plans per rank but the workers' FSDP2 (worker/training/sharded.py) does not train."""
    res = spec.resources
    if res.effective_sharding is None:
        return
    reasons = []
    if spec.method is Method.qlora:
        reasons.append(
            "method qlora: the workers do not shard bitsandbytes' 4-bit weights (a Params4bit keeps its "
            "quant_state on the Python object, which FSDP2's DTensor shards do not carry); use lora, or qlora on "
            "one GPU"
        )
    if res.offload is Offload.optimizer:
        reasons.append(
            "offload 'optimizer': FSDP2 offloads the sharded params, grads and optimizer states together; use "
            "offload 'params'"
        )
    if spec.lora_options is not None and spec.lora_options.init == "pissa":
        reasons.append("lora.init 'pissa' converts the whole adapter at the end: it trains on one GPU only")
    if spec.memory.offload_activations:
        reasons.append(
            "memory.offload_activations: a sharded layer's gathered weights are not the model's parameters, so "
            "the offload would copy them to the host on every forward; it trains on one GPU only"
        )
    if spec.memory.liger_kernels:
        reasons.append(
            "memory.liger_kernels: the sharded root runs the chunked loss as its own FSDP2 forward method, and "
            "the workers keep transformers' modules there; leave liger_kernels unset"
        )
    if reasons:
        raise UnsupportedSharding(f"resources.sharding {res.effective_sharding.value}: " + "; ".join(reasons))


def _refuse_more_gpus_than_a_worker_has(session: Session, settings: Settings, spec: JobSpec) -> None:
    """With GPU workers live, a job needing more GPUs than any one of them has would wait forever: refused. With
    none registered (CPU workers, or none started yet) it queues, and a worker with too few slots sends it on."""
    per_worker = gpus_per_worker(live_gpus(session, settings))
    wanted = spec.resources.num_gpus
    if per_worker and max(per_worker.values()) < wanted:
        raise NotEnoughGpus(
            f"resources.num_gpus {wanted}: the largest live worker has {max(per_worker.values())} GPU(s); "
            "ask for that many or fewer (POST /v1/plans suggests a sharding that fits)",
            max_num_gpus=max(per_worker.values()),
        )


def _check_quota(session: Session, settings: Settings, tenant_id: str) -> None:
    tenant = tenancy.lock_tenant(session, tenant_id)
    limit = tenant.max_active_jobs or settings.max_active_jobs_per_tenant
    active = tenancy.count_active_jobs(session, tenant_id)
    if active >= limit:
        raise QuotaExceeded(
            f"tenant {tenant.name!r} has {active} active jobs; its limit is {limit}", max_active_jobs=limit
        )


def _with_resolved_micro_batch(spec: JobSpec, job_plan: Plan) -> JobSpec:
    if spec.training.micro_batch_size != "auto":
        return spec
    training = spec.training.model_copy(update={"micro_batch_size": job_plan.micro_batch_size})
    return spec.model_copy(update={"training": training})


def _does_not_fit_detail(job_plan: Plan) -> str:
    gib = 1024**3
    detail = (
        f"predicted peak {job_plan.peak_vram_bytes / gib:.2f} GiB exceeds the "
        f"{job_plan.gpu_memory_bytes / gib:.2f} GiB GPU less its {job_plan.safety_margin_bytes / gib:.2f} GiB "
        "safety margin"
    )
    if job_plan.suggestions:
        detail += f"; try: {job_plan.suggestions[0].description}"
    elif job_plan.min_gpu_memory_bytes:  # nothing fits: the plan's last reason names the smallest GPU / count
        detail += f"; {job_plan.reasons[-1]}"
    return detail


def load_job(session: Session, job_id: str, tenant_id: str | None = None) -> Job:
    """The job if `tenant_id` may see it (None: any tenant). Another tenant's job is as missing as no job."""
    job = repository.get_job(session, job_id, tenant_id) if ID_PATTERN.fullmatch(job_id) else None
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def get_job(session: Session, job_id: str, caller: Caller) -> Job:
    """The caller's job as an entity, for the responses that need more of it than a status poll."""
    return load_job(session, job_id, caller.tenant_scope)


def read_job(connection: Connection, job_id: str, caller: Caller) -> tuple[Row, list[Row]]:
    """The job's row and its attempts', for reading only: what every status poll asks for."""
    found = repository.read_job(connection, job_id, caller.tenant_scope) if ID_PATTERN.fullmatch(job_id) else None
    if found is None:
        raise JobNotFound(f"no job {job_id!r}")
    return found


def list_jobs(
    session: Session,
    status: JobStatus | None,
    limit: int,
    after: str | None,
    tenant_name: str | None,
    caller: Caller,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], bool]:
    """A page of the caller's jobs, newest first, continuing after the job `after`; and whether more follow.
    `tenant_name` narrows an admin's list to one tenant; `metadata`, to jobs carrying these metadata values."""
    before_seq = None
    if after is not None:
        anchor = repository.get_job(session, after, caller.tenant_scope) if ID_PATTERN.fullmatch(after) else None
        if anchor is None:
            raise InvalidCursor(f"no job {after!r} to continue after")
        before_seq = anchor.seq
    jobs = repository.list_jobs(
        session,
        status=status,
        limit=limit + 1,
        before_seq=before_seq,
        tenant_id=caller.tenant_scope,
        tenant_name=tenant_name if caller.admin else None,
        metadata=metadata,
    )
    return jobs[:limit], len(jobs) > limit


def list_events(connection: Connection, job_id: str, after_seq: int, limit: int, caller: Caller) -> list[Row]:
    """A page of the job's events: polled like its status, so read as rows (repository.list_events)."""
    if not (ID_PATTERN.fullmatch(job_id) and repository.job_exists(connection, job_id, caller.tenant_scope)):
        raise JobNotFound(f"no job {job_id!r}")
    return repository.list_events(connection, job_id, after_seq=after_seq, limit=limit)


def events_since(
    connection: Connection, job_id: str, after_seq: int, limit: int, caller: Caller
) -> tuple[list[Row], bool]:
    """A page of the job's events after `after_seq`, and whether no event can follow them: the job had ended
    before they were read (its last state event commits with its status) and the page is not full."""
    status = repository.job_status(connection, job_id, caller.tenant_scope) if ID_PATTERN.fullmatch(job_id) else None
    if status is None:
        raise JobNotFound(f"no job {job_id!r}")
    events = repository.list_events(connection, job_id, after_seq=after_seq, limit=limit)
    return events, JobStatus(status).is_terminal and len(events) < limit


def list_events_newest_first(
    connection: Connection, job_id: str, before_seq: int, limit: int, caller: Caller
) -> list[Row]:
    """A page of the job's events, newest first, older than `before_seq`: the OpenAI API's order."""
    if not (ID_PATTERN.fullmatch(job_id) and repository.job_exists(connection, job_id, caller.tenant_scope)):
        raise JobNotFound(f"no job {job_id!r}")
    return repository.list_events_newest_first(connection, job_id, before_seq=before_seq, limit=limit)


def get_artifact_job(session: Session, job_id: str, name: str, caller: Caller) -> Job:
    """The job, if it recorded an artifact by this name: only names the worker recorded are ever served, so no
    path from a URL reaches storage unchecked."""
    job = load_job(session, job_id, caller.tenant_scope)
    if name not in {artifact["name"] for artifact in job.artifacts or []}:
        raise ArtifactNotFound(f"job {job.id} has no artifact {name!r}")
    return job


def get_artifacts_job(session: Session, job_id: str, caller: Caller) -> Job:
    """The job, if it recorded any artifact (only a succeeded job does)."""
    job = load_job(session, job_id, caller.tenant_scope)
    if not job.artifacts:
        raise ArtifactNotFound(f"job {job.id} has no artifacts (it is {job.status})")
    return job


_CANCEL_TARGET = {JobStatus.queued: JobStatus.cancelled, JobStatus.running: JobStatus.cancelling}


def cancel_job(session: Session, job_id: str, caller: Caller, reason: str | None = None) -> Job:
    """Queued jobs end at once; running ones go to cancelling and their worker stops the training process.
    A `reason` (a sweep's pruner stopped the trial) is recorded on the state event."""
    job = load_job(session, job_id, caller.tenant_scope)
    for _ in range(2):  # a worker may claim the job between our read and our update: then try once more
        if job.status == JobStatus.cancelling.value:
            return job
        target = _CANCEL_TARGET.get(JobStatus(job.status))
        if target is None:
            break
        event = {"reason": reason} if reason else None
        if repository.transition(session, job_id, target, event=event, cancelled_by_key_id=caller.key_id):
            return load_job_fresh(session, job_id)
        job = load_job_fresh(session, job_id)
    raise InvalidTransition(f"job {job_id} is {job.status} and cannot be cancelled")


def load_job_fresh(session: Session, job_id: str) -> Job:
    session.expire_all()
    return load_job(session, job_id)
