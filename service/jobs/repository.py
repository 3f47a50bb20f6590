"""Every SQL statement about jobs, their events, files and GPUs. Functions flush; callers commit."""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Integer, Row, bindparam, delete, exists, func, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, joinedload

from domain.states import ALLOWED_FROM, JobStatus
from service.models import DatasetValidation, Job, JobAttempt, JobEvent, RegisteredGpu, Tenant, UploadedFile, utcnow
from service.webhooks import repository as webhooks

JOBS, ATTEMPTS = Job.__table__, JobAttempt.__table__
# Built once, as they run on every status poll: no statement is constructed per request, and Core rows skip the
# ORM's identity map and instrumentation. The rows carry the same attribute names as the entities.
# Only the columns a response shows: the driver describes every column of every result, and the jobs row has more.
_JOB_COLUMNS = [
    JOBS.c[name]
    for name in (
        "id",
        "status",
        "tenant_id",
        "created_by_key_id",
        "cancelled_by_key_id",
        "spec",
        "requested_spec",
        "oom_recoveries",
        "progress",
        "predicted_peak_bytes",
        "measured_peak_bytes",
        "plan",
        "error_code",
        "error_message",
        "artifacts",
        "created_at",
        "started_at",
        "finished_at",
    )
]
_ATTEMPT_COLUMNS = ("number", "worker_hostname", "started_at", "ended_at", "outcome", "detail", "resumed_from_step")
# The job and its attempts in one statement: a row per attempt (one, mostly), the job's columns repeated.
_JOB_BY_ID = (
    select(*_JOB_COLUMNS, *(ATTEMPTS.c[name].label(f"attempt_{name}") for name in _ATTEMPT_COLUMNS))
    .select_from(JOBS.outerjoin(ATTEMPTS, ATTEMPTS.c.job_id == JOBS.c.id))
    .where(JOBS.c.id == bindparam("job_id"))
    .order_by(ATTEMPTS.c.number)
)
_JOB_BY_ID_IN_TENANT = _JOB_BY_ID.where(JOBS.c.tenant_id == bindparam("tenant_id"))


_JOB_EXISTS = select(JOBS.c.id).where(JOBS.c.id == bindparam("job_id"))
_JOB_EXISTS_IN_TENANT = _JOB_EXISTS.where(JOBS.c.tenant_id == bindparam("tenant_id"))
_JOB_STATUS = select(JOBS.c.status).where(JOBS.c.id == bindparam("job_id"))
_JOB_STATUS_IN_TENANT = _JOB_STATUS.where(JOBS.c.tenant_id == bindparam("tenant_id"))
EVENTS = JobEvent.__table__
# Two row-value bounds, (job_id, after) < (job_id, seq) <= (job_id, max), and ORDER BY job_id, seq: a range of
# ix_job_events_job_seq read in order, stopping after `limit` rows, whatever the statistics say. With a plain
# `job_id = :id`, PostgreSQL knows job_id is constant, may walk the primary key in seq order instead, and then
# filters every later event of every job (23 ms among 100,000 jobs, 478 ms in the issue; docs/performance.md).
SEQ_MAX = 2**63 - 1
_EVENTS_PAGE = (
    select(EVENTS.c.seq, EVENTS.c.kind, EVENTS.c.data, EVENTS.c.created_at)
    .where(
        tuple_(EVENTS.c.job_id, EVENTS.c.seq) > tuple_(bindparam("job_id"), bindparam("after_seq")),
        tuple_(EVENTS.c.job_id, EVENTS.c.seq) <= tuple_(bindparam("job_id"), SEQ_MAX),
    )
    .order_by(EVENTS.c.job_id, EVENTS.c.seq)
    .limit(bindparam("limit", type_=Integer))
)

# The same range of the index walked backwards.
_EVENTS_PAGE_DESC = (
    select(EVENTS.c.seq, EVENTS.c.kind, EVENTS.c.data, EVENTS.c.created_at)
    .where(
        tuple_(EVENTS.c.job_id, EVENTS.c.seq) < tuple_(bindparam("job_id"), bindparam("before_seq")),
        tuple_(EVENTS.c.job_id, EVENTS.c.seq) > tuple_(bindparam("job_id"), 0),
    )
    .order_by(EVENTS.c.job_id.desc(), EVENTS.c.seq.desc())
    .limit(bindparam("limit", type_=Integer))
)


class AttemptRow(NamedTuple):
    """An attempt as read with its job, under the entity's attribute names."""

    number: int
    worker_hostname: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None
    detail: str | None
    resumed_from_step: int | None


def add_job(session: Session, job: Job) -> Job:
    session.add(job)
    session.flush()
    add_event(session, job.id, "state", {"status": job.status})
    return job


def get_job(session: Session, job_id: str, tenant_id: str | None = None) -> Job | None:
    """The job with its attempts, in one statement, if it belongs to `tenant_id` (any tenant when None)."""
    query = select(Job).where(Job.id == job_id).options(joinedload(Job.attempts))
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    return session.execute(query).unique().scalar_one_or_none()


def read_job(connection: Connection, job_id: str, tenant_id: str | None = None) -> tuple[Row, list[AttemptRow]] | None:
    """The job's row and its attempts' rows, read-only, if it belongs to `tenant_id` (any tenant when None)."""
    if tenant_id is None:
        rows = connection.execute(_JOB_BY_ID, {"job_id": job_id}).all()
    else:
        rows = connection.execute(_JOB_BY_ID_IN_TENANT, {"job_id": job_id, "tenant_id": tenant_id}).all()
    if not rows:
        return None
    attempts = [AttemptRow(*row[-len(_ATTEMPT_COLUMNS) :]) for row in rows if row.attempt_number is not None]
    return rows[0], attempts


def list_jobs(
    session: Session,
    *,
    status: JobStatus | None,
    limit: int,
    before_seq: int | None,
    tenant_id: str | None = None,
    tenant_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> list[Job]:
    """Newest first; `before_seq` continues a page; `tenant_id`/`tenant_name` narrow it to one tenant;
    `metadata`, to jobs whose spec.metadata has each of these values."""
    query = select(Job).order_by(Job.seq.desc()).limit(limit)
    for key, value in (metadata or {}).items():
        query = query.where(Job.spec["metadata"][key].as_string() == value)
    if tenant_id is not None:
        query = query.where(Job.tenant_id == tenant_id)
    if tenant_name is not None:
        query = query.join(Tenant, Job.tenant_id == Tenant.id).where(Tenant.name == tenant_name)
    if status is not None:
        query = query.where(Job.status == status.value)
    if before_seq is not None:
        query = query.where(Job.seq < before_seq)
    return list(session.scalars(query))


def count_jobs_by_status(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count()).group_by(Job.status))
    return {status: count for status, count in rows}


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    attempt: int | None = None,
    event: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move a job to `to` if its current state allows it; False if another actor got there first.

    With `attempt`, the move is fenced: it happens only while that attempt is still the job's newest one.
    """
    now = utcnow()
    values: dict[str, Any] = {"status": to.value, "updated_at": now, **fields}
    if to.is_terminal:
        values["finished_at"] = now
        values["lease_expires_at"] = None
    allowed = [state.value for state in ALLOWED_FROM[to]]
    query = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if attempt is not None:
        query = query.where(Job.attempt == attempt)
    result = session.execute(query.values(**values).execution_options(synchronize_session=False))
    if result.rowcount != 1:
        return False
    data = {"status": to.value, **(event or {})}
    if fields.get("error_code"):
        data["error"] = {"code": fields["error_code"], "message": fields.get("error_message")}
    add_event(session, job_id, "state", data)
    return True


def current_status(session: Session, job_id: str) -> JobStatus | None:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return JobStatus(status) if status else None


def record_progress(session: Session, job_id: str, progress: dict[str, Any]) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(progress=progress, updated_at=utcnow()))
    add_event(session, job_id, "progress", progress)


def set_job_fields(session: Session, job_id: str, **fields: Any) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow(), **fields))


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> None:
    """Append an event; a state change or checkpoint is queued for the tenant's webhook in the same transaction."""
    event = JobEvent(job_id=job_id, kind=kind, data=data)
    session.add(event)
    session.flush()
    if kind in webhooks.EVENT_TYPES:
        webhooks.add_for_event(session, event)


def job_exists(connection: Connection, job_id: str, tenant_id: str | None = None) -> bool:
    if tenant_id is None:
        return connection.execute(_JOB_EXISTS, {"job_id": job_id}).first() is not None
    return connection.execute(_JOB_EXISTS_IN_TENANT, {"job_id": job_id, "tenant_id": tenant_id}).first() is not None


def job_status(connection: Connection, job_id: str, tenant_id: str | None = None) -> str | None:
    if tenant_id is None:
        return connection.execute(_JOB_STATUS, {"job_id": job_id}).scalar()
    return connection.execute(_JOB_STATUS_IN_TENANT, {"job_id": job_id, "tenant_id": tenant_id}).scalar()


def list_events_newest_first(connection: Connection, job_id: str, *, before_seq: int, limit: int) -> list[Row]:
    """Rows of (seq, kind, data, created_at), newest first, before `before_seq`: the OpenAI events order."""
    return connection.execute(_EVENTS_PAGE_DESC, {"job_id": job_id, "before_seq": before_seq, "limit": limit}).all()


def list_events(connection: Connection, job_id: str, *, after_seq: int, limit: int) -> list[Row]:
    """Rows of (seq, kind, data, created_at), oldest first, after `after_seq`."""
    return connection.execute(_EVENTS_PAGE, {"job_id": job_id, "after_seq": after_seq, "limit": limit}).all()


def delete_progress_events(session: Session, finished_before: datetime, limit: int) -> int:
    """Delete up to `limit` progress events of jobs that finished before then; how many went."""
    old_jobs = select(Job.id).where(Job.finished_at < finished_before)
    doomed = select(JobEvent.seq).where(JobEvent.kind == "progress", JobEvent.job_id.in_(old_jobs)).limit(limit)
    return session.execute(
        delete(JobEvent).where(JobEvent.seq.in_(doomed)).execution_options(synchronize_session=False)
    ).rowcount


def add_file(session: Session, uploaded: UploadedFile) -> UploadedFile:
    session.add(uploaded)
    session.flush()
    return uploaded


def get_file(session: Session, file_id: str, tenant_id: str | None = None) -> UploadedFile | None:
    query = select(UploadedFile).where(UploadedFile.id == file_id)
    if tenant_id is not None:
        query = query.where(UploadedFile.tenant_id == tenant_id)
    return session.scalar(query)


def list_files(
    session: Session, tenant_id: str | None, *, limit: int, after: UploadedFile | None, newest_first: bool
) -> list[UploadedFile]:
    """A page of files in (created_at, id) order, continuing after `after`; `tenant_id` None: every tenant's."""
    key = tuple_(UploadedFile.created_at, UploadedFile.id)
    query = select(UploadedFile).limit(limit)
    query = query.order_by(
        *(column.desc() if newest_first else column for column in (UploadedFile.created_at, UploadedFile.id))
    )
    if tenant_id is not None:
        query = query.where(UploadedFile.tenant_id == tenant_id)
    if after is not None:
        bound = tuple_(after.created_at, after.id)
        query = query.where(key < bound if newest_first else key > bound)
    return list(session.scalars(query))


def delete_file(session: Session, uploaded: UploadedFile) -> None:
    session.delete(uploaded)
    session.flush()


def file_in_active_job(session: Session, dataset_url: str) -> bool:
    """Whether a job that has not ended still reads this dataset, to train or to validate on (its worker would
    find it gone)."""
    active = [status.value for status in JobStatus if not status.is_terminal]
    reads_it = or_(Job.dataset_url == dataset_url, Job.validation_dataset_url == dataset_url)
    return session.scalar(select(exists().where(reads_it, Job.status.in_(active))))


def record_file_validation(session: Session, file_id: str, dataset_format: str, rows: int) -> None:
    session.execute(
        update(UploadedFile).where(UploadedFile.id == file_id).values(validated_format=dataset_format, rows=rows)
    )


def validated_rows(session: Session, url: str, size_bytes: int, version: str, dataset_format: str) -> int | None:
    """The row count recorded when this version of the file was validated in this format; None if never."""
    return session.scalar(
        select(DatasetValidation.rows).where(
            DatasetValidation.url == url,
            DatasetValidation.size_bytes == size_bytes,
            DatasetValidation.version == version,
            DatasetValidation.dataset_format == dataset_format,
        )
    )


def record_dataset_validation(
    session: Session, url: str, size_bytes: int, version: str, dataset_format: str, rows: int
) -> None:
    # Two submissions of a new file may both validate it: the second insert finds the first's row and keeps it.
    dialect_insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(
        dialect_insert(DatasetValidation)
        .values(
            url=url,
            size_bytes=size_bytes,
            version=version,
            dataset_format=dataset_format,
            rows=rows,
            validated_at=utcnow(),
        )
        .on_conflict_do_nothing()
    )


def register_gpus(session: Session, hostname: str, gpus: list[tuple[int, str, int]]) -> None:
    session.execute(delete(RegisteredGpu).where(RegisteredGpu.worker_hostname == hostname))
    for index, name, total_bytes in gpus:
        session.add(
            RegisteredGpu(worker_hostname=hostname, device_index=index, name=name, total_memory_bytes=total_bytes)
        )
    session.flush()


def unregister_gpus(session: Session, hostname: str) -> None:
    session.execute(delete(RegisteredGpu).where(RegisteredGpu.worker_hostname == hostname))


def heartbeat_gpus(session: Session, hostname: str) -> None:
    session.execute(
        update(RegisteredGpu).where(RegisteredGpu.worker_hostname == hostname).values(heartbeat_at=utcnow())
    )


def expire_gpus(session: Session, heartbeat_before: datetime) -> int:
    """Forget GPUs whose worker stopped heartbeating (a crashed worker, a lost spot machine)."""
    return session.execute(delete(RegisteredGpu).where(RegisteredGpu.heartbeat_at < heartbeat_before)).rowcount


def list_gpus(session: Session, *, heartbeat_after: datetime | None = None) -> list[RegisteredGpu]:
    """Registered GPUs, largest first; with `heartbeat_after`, only those of workers alive since then."""
    query = select(RegisteredGpu).order_by(RegisteredGpu.total_memory_bytes.desc())
    if heartbeat_after is not None:
        query = query.where(RegisteredGpu.heartbeat_at >= heartbeat_after)
    return list(session.scalars(query))
