"""Response bodies. Request bodies are the JobSpec itself (planner/spec.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field, field_serializer

from service.models import Job, JobAttempt, JobEvent, UploadedFile


class _Timestamps(BaseModel):
    @field_serializer("*", when_used="json")
    def _utc(self, value: Any) -> Any:
        # SQLite hands back naive datetimes; every stored time is UTC.
        if isinstance(value, datetime) and value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value


class JobError(BaseModel):
    code: str
    message: str | None


class Artifact(BaseModel):
    name: str = Field(description="Path inside the job's output, e.g. adapter/adapter_model.safetensors")
    size_bytes: int
    url: str


class AttemptOut(_Timestamps):
    number: int
    worker: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None = Field(description="succeeded | failed | cancelled | crashed | drained | lease_expired | "
                                            "worker_restarted | staging_failed; null while the attempt runs")
    detail: str | None
    resumed_from_step: int | None = Field(description="the checkpoint step it resumed from; null for a fresh start")

    @classmethod
    def of(cls, attempt: JobAttempt) -> AttemptOut:
        return cls(number=attempt.number, worker=attempt.worker_hostname, started_at=attempt.started_at,
                   ended_at=attempt.ended_at, outcome=attempt.outcome, detail=attempt.detail,
                   resumed_from_step=attempt.resumed_from_step)


class JobOut(_Timestamps):
    id: str
    status: str
    tenant_id: str
    created_by_key_id: str | None = Field(description="The API key that submitted the job")
    cancelled_by_key_id: str | None = Field(description="The API key that cancelled it, if one did")
    spec: dict[str, Any]
    progress: dict[str, Any] | None = Field(
        description="step, total_steps, loss, learning_rate, tokens_per_second, eta_seconds, memory figures")
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    peak_error_ratio: float | None = Field(description="measured / predicted peak, once measured on a GPU")
    plan: dict[str, Any]
    error: JobError | None
    artifacts: list[Artifact]
    attempts: list[AttemptOut]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        ratio = job.measured_peak_bytes / job.predicted_peak_bytes if job.measured_peak_bytes else None
        artifacts = [Artifact(name=a["name"], size_bytes=a["size_bytes"],
                              url=f"/v1/jobs/{job.id}/artifacts/{a['name']}") for a in job.artifacts or []]
        error = JobError(code=job.error_code, message=job.error_message) if job.error_code else None
        return cls(id=job.id, status=job.status, tenant_id=job.tenant_id, created_by_key_id=job.created_by_key_id,
                   cancelled_by_key_id=job.cancelled_by_key_id, spec=job.spec, progress=job.progress,
                   predicted_peak_bytes=job.predicted_peak_bytes, measured_peak_bytes=job.measured_peak_bytes,
                   peak_error_ratio=ratio, plan=job.plan, error=error, artifacts=artifacts,
                   attempts=[AttemptOut.of(attempt) for attempt in job.attempts], created_at=job.created_at,
                   started_at=job.started_at, finished_at=job.finished_at)


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last page")


class EventOut(_Timestamps):
    seq: int
    kind: str = Field(description="state | progress | checkpoint | log")
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(seq=event.seq, kind=event.kind, data=event.data, created_at=event.created_at)


class EventPage(BaseModel):
    data: list[EventOut]
    next_cursor: int = Field(description="Pass as `after` to get only newer events")


class FileOut(_Timestamps):
    id: str
    filename: str
    size_bytes: int
    sha256: str
    rows: int | None = None
    created_at: datetime

    validated_format: str | None = Field(None, description="The format every row was checked against, if any")

    @classmethod
    def of(cls, uploaded: UploadedFile) -> FileOut:
        return cls(id=uploaded.id, filename=uploaded.filename, size_bytes=uploaded.size_bytes,
                   sha256=uploaded.sha256, rows=uploaded.rows, validated_format=uploaded.validated_format,
                   created_at=uploaded.created_at)
