"""Database tables. The jobs row is the truth about a job; the broker only carries its id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

JsonDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite has no 64-bit autoincrementing BIGINT primary key; INTEGER there is already 64-bit.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    """A team whose jobs and files are its own. Other tenants get 404 for them; admin keys see every tenant."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)  # None: the service default
    # Where the tenant's jobs' state changes and checkpoints are POSTed (service/webhooks), signed with the secret
    # (Standard Webhooks, `whsec_` + base64). Kept in plain text: signing needs the secret itself, not a hash.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """Only the key's SHA-256 is stored; the key itself is shown once, when it is created."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        # The reconciler's two scans: expired leases of running jobs, and jobs queued for too long.
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_status_queued_at", "status", "queued_at"),
        # One per list filter, each ending in seq, so a page newest-first reads `limit` index entries
        # whatever the table's size: an admin's by status, a tenant's, a tenant's by status.
        Index("ix_jobs_status_seq", "status", "seq"),
        Index("ix_jobs_tenant_id_seq", "tenant_id", "seq"),
        Index("ix_jobs_tenant_id_status_seq", "tenant_id", "status", "seq"),
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    status: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    created_by_key_id: Mapped[str | None] = mapped_column(String(40))
    cancelled_by_key_id: Mapped[str | None] = mapped_column(String(40))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonDocument)  # what runs: an OOM recovery may change it
    # The spec as the caller asked for it, kept once an OOM recovery changes `spec`; None while they are equal.
    requested_spec: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    oom_recoveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    plan: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    base_model_path: Mapped[str] = mapped_column(Text)
    dataset_url: Mapped[str] = mapped_column(Text)  # a local path or s3:// URL (service/storage.py)
    validation_dataset_url: Mapped[str | None] = mapped_column(Text)  # spec.validation_dataset's, if it has one
    predicted_peak_bytes: Mapped[int] = mapped_column(BigInteger)
    measured_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    artifacts: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDocument)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    worker_hostname: Mapped[str | None] = mapped_column(String(255))
    child_pid: Mapped[int | None] = mapped_column(Integer)
    # The number of the newest attempt (0 before the first claim). Every write an attempt makes is fenced by it:
    # UPDATE ... WHERE attempt = :mine, so an attempt that lost its lease can no longer write anything.
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # when it last became queued
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    attempts: Mapped[list[JobAttempt]] = relationship(order_by="JobAttempt.number", lazy="selectin", viewonly=True)


class JobAttempt(Base):
    """One run of a job on one worker, from its claim to its outcome."""

    __tablename__ = "job_attempts"

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_hostname: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # succeeded | failed | cancelled | crashed | drained | lease_expired | requeued; null while it runs
    outcome: Mapped[str | None] = mapped_column(String(32))
    detail: Mapped[str | None] = mapped_column(Text)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)  # null for a fresh start
    child_pid: Mapped[int | None] = mapped_column(Integer)


class JobCheckpoint(Base):
    """A complete checkpoint in storage. Only a fenced write by the attempt that owns the job adds one, so a
    resume never picks up what a stale attempt wrote."""

    __tablename__ = "job_checkpoints"

    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    storage_key: Mapped[str] = mapped_column(Text)
    # step, epoch, tokens_seen, train_loss (worker/training/checkpoint.py); null for checkpoints written before
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobEvent(Base):
    """An append-only log per job: state changes, progress and checkpoints. Its seq is the events cursor."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class UploadedFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    # Set once the file has been checked row by row, so submissions reuse the result instead of re-reading it.
    validated_format: Mapped[str | None] = mapped_column(String(32))
    rows: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DatasetValidation(Base):
    """A dataset under the data root whose every row was checked in a format. Submitting the same file again
    (same size and version: mtime or ETag) costs a lookup here, not a read of the file."""

    __tablename__ = "dataset_validations"

    url: Mapped[str] = mapped_column(Text, primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    version: Mapped[str] = mapped_column(String(255), primary_key=True)
    dataset_format: Mapped[str] = mapped_column(String(32), primary_key=True)
    rows: Mapped[int] = mapped_column(BigInteger)
    validated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RegisteredGpu(Base):
    """A GPU some worker offers. The API plans against the largest one."""

    __tablename__ = "gpus"

    worker_hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    device_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    total_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Renewed by the worker while it lives; planning ignores GPUs whose worker stopped heartbeating.
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyKey(Base):
    """A POST's Idempotency-Key within its tenant, and the first response to it (service/idempotency.py).

    `status_code` is null while the first request runs; `token` says which request holds it then, so a request
    that took the key over from a stalled one fences the stalled one out. Deleted 24 h after `created_at`."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)

    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))  # SHA-256 of the method, path, query and body
    token: Mapped[str] = mapped_column(String(32))
    status_code: Mapped[int | None] = mapped_column(Integer)
    content_type: Mapped[str | None] = mapped_column(String(255))
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one message per state change or checkpoint of a job whose tenant has a webhook, inserted in
    the same transaction as the event it reports, sent by the workers (service/webhooks/delivery.py)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),  # the senders' scan for due ones
        Index("ix_webhook_deliveries_job_id_event_seq", "job_id", "event_seq"),  # a job's delivery log
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # the webhook-id header: the same on every retry
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"))
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id", ondelete="CASCADE"))
    event_seq: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(32))
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the exact body signed and sent, every time
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class WebhookAttempt(Base):
    """One POST of a delivery and what came of it: the delivery log."""

    __tablename__ = "webhook_attempts"

    delivery_id: Mapped[str] = mapped_column(
        String(40), ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), primary_key=True
    )
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status_code: Mapped[int | None] = mapped_column(Integer)  # null: no answer (refused, timed out)
    error: Mapped[str | None] = mapped_column(Text)
    duration_seconds: Mapped[float] = mapped_column(Float)


class PlannerMeasurement(Base):
    """A succeeded GPU job's measured peak beside the peak the model computed for it, with what decides the
    error: the planner's correction per (gpu_model, family) is learned from these (service/calibration/)."""

    __tablename__ = "planner_measurements"
    __table_args__ = (
        # The planner's one query: the newest measurements of one (GPU model, family).
        Index("ix_planner_measurements_gpu_family_created", "gpu_model", "family", "created_at"),
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"))
    gpu_model: Mapped[str] = mapped_column(String(255))  # NVML's name, as the worker registers its GPUs
    driver: Mapped[str | None] = mapped_column(String(64))
    library_versions: Mapped[dict[str, str]] = mapped_column(JsonDocument)  # torch, transformers, peft, bnb
    architecture: Mapped[str] = mapped_column(String(64))  # config.json's model_type
    method: Mapped[str] = mapped_column(String(32))
    optimizer: Mapped[str] = mapped_column(String(64))
    family: Mapped[str] = mapped_column(String(128))  # planner.calibration.recipe_family of the spec that ran
    phase_at_peak: Mapped[str | None] = mapped_column(String(32))  # the plan's peak phase
    predicted_peak_bytes: Mapped[int] = mapped_column(BigInteger)  # the model's, before any learned correction
    measured_peak_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Sweep(Base):
    """A hyperparameter search of one tenant (service/sweeps). optuna's study holds what the sampler and pruner
    need (its own tables, apart from these: service/sweeps/study.py); these rows say what each trial became."""

    __tablename__ = "sweeps"
    __table_args__ = (Index("ix_sweeps_status", "status"),)  # the drivers' scan for active sweeps

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40), ForeignKey("tenants.id"), index=True)
    created_by_key_id: Mapped[str | None] = mapped_column(String(40))  # its trials' jobs are this key's
    status: Mapped[str] = mapped_column(String(16))  # running | cancelling | succeeded | cancelled | failed
    request: Mapped[dict[str, Any]] = mapped_column(JsonDocument)  # SweepRequest, its sampler seed filled in
    study_name: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SweepTrial(Base):
    """One optuna trial (its number is optuna's) and the job it runs as; no job when it was pruned unrun."""

    __tablename__ = "sweep_trials"

    sweep_id: Mapped[str] = mapped_column(String(40), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(40), ForeignKey("jobs.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(JsonDocument)
    state: Mapped[str] = mapped_column(String(16))  # queued | running | complete | pruned | failed
    value: Mapped[float | None] = mapped_column(Float)  # the metric at the job's end (complete trials)
    predicted_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)  # the planner's, also for one that did not fit
    pruned_reason: Mapped[str | None] = mapped_column(Text)
    # The job's events up to this seq have been read for intermediate values (reported to optuna).
    last_event_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
