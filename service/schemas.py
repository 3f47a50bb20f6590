"""Response bodies. Request bodies are the JobSpec itself (domain/spec.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema
from sqlalchemy import Row

from domain.spec import DatasetFormat, JobSpec
from domain.states import JobStatus
from planner import Plan
from service.models import Job, JobAttempt, JobCheckpoint, JobEvent, UploadedFile


def _as_utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; every stored time is UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


# Checked when a response is built, on the time fields alone: a serializer on every field ("*") would run
# Python code for each field of each response, the spec and plan included.
UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class StoredAs:
    """A JSON document that `model` wrote (`model_dump(mode="json")`) when it was stored, declared in OpenAPI as
    `model`. It is served as stored, neither validated nor rebuilt: it was validated once, when it was written.
    Validating it again would cost every status poll (about 15 µs for a JobSpec), and a spec stored by an older
    release would then have to pass today's validators to be read at all."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model
        self.model_schema: core_schema.CoreSchema | None = None

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        self.model_schema = handler.generate_schema(self.model)
        # The model's schema rides along as the serializer's, so its definitions stay in the tree for OpenAPI;
        # the serializer itself hands the dict on as it is.
        return core_schema.dict_schema(
            serialization=core_schema.wrap_serializer_function_ser_schema(
                lambda value, _next: value, schema=self.model_schema
            )
        )

    def __get_pydantic_json_schema__(
        self, _schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        # Through the generator itself rather than `handler`, which inlines the model: with it, the model is one
        # component that this field refers to, as a field of the model type would.
        return handler.generate_json_schema.generate_inner(self.model_schema)


class Progress(BaseModel):
    """What a worker stores as a running job's progress: worker/training/recipe.py `Progress` and the training
    process's resident memory (worker/job_process.py). tests/worker/test_progress_contract.py holds them equal."""

    model_config = ConfigDict(extra="forbid")
    step: int = Field(description="Optimizer steps completed")
    total_steps: int
    epoch: float = Field(description="Fractional epochs consumed")
    loss: float = Field(
        description="Mean loss over the steps since the previous report: per token (sft), per example (preference)"
    )
    learning_rate: float = Field(description="The learning rate this step used")
    tokens_per_second: float = Field(description="Non-padding tokens per second of training so far")
    tokens_seen: int | None = Field(None, description="Non-padding tokens trained on so far")
    eta_seconds: float | None
    memory_allocated_bytes: int | None = Field(description="torch's allocated GPU memory; null on the CPU")
    memory_reserved_bytes: int | None = Field(description="torch's reserved GPU memory; null on the CPU")
    memory_peak_bytes: int | None = Field(description="Peak reserved GPU memory since the job started")
    eval_loss: float | None = Field(None, description="Per-token loss on the held-out validation examples")
    preference: dict[str, float] | None = Field(
        None,
        description="dpo, kto, orpo: means since the previous report of chosen_reward, rejected_reward, margin "
        "(beta x the policy/reference log-ratio; orpo: beta x the mean token log-probability), accuracy (dpo, orpo: "
        "how often the chosen reward is the higher), kl (kto), and eval_accuracy on the held-out pairs",
    )
    process_resident_bytes: int | None = Field(None, description="The training process's resident memory (Linux)")
    process_peak_resident_bytes: int | None = Field(None, description="Its peak resident memory (Linux)")


class JobError(BaseModel):
    code: str
    message: str | None


class Artifact(BaseModel):
    name: str = Field(description="Path inside the job's output, e.g. adapter/adapter_model.safetensors")
    size_bytes: int
    url: str


class AttemptOut(BaseModel):
    number: int
    worker: str
    started_at: UtcDatetime
    ended_at: UtcDatetime | None
    outcome: str | None = Field(
        description="succeeded | failed | cancelled | crashed | drained | lease_expired | "
        "worker_restarted | staging_failed | rank_lost (a sharded job's rank died); null while the attempt runs"
    )
    detail: str | None
    resumed_from_step: int | None = Field(description="the checkpoint step it resumed from; null for a fresh start")

    @classmethod
    def of(cls, attempt: JobAttempt) -> AttemptOut:
        return cls(
            number=attempt.number,
            worker=attempt.worker_hostname,
            started_at=attempt.started_at,
            ended_at=attempt.ended_at,
            outcome=attempt.outcome,
            detail=attempt.detail,
            resumed_from_step=attempt.resumed_from_step,
        )


class JobOut(BaseModel):
    id: str
    status: JobStatus
    tenant_id: str
    created_by_key_id: str | None = Field(description="The API key that submitted the job")
    cancelled_by_key_id: str | None = Field(description="The API key that cancelled it, if one did")
    spec: Annotated[dict[str, Any], StoredAs(JobSpec)] = Field(
        description="The spec that runs: as accepted with micro_batch_size resolved, then as each out-of-memory "
        "recovery changed it"
    )
    requested_spec: Annotated[dict[str, Any], StoredAs(JobSpec)] | None = Field(
        description="The spec as accepted, once an out-of-memory recovery has changed `spec`; null until then"
    )
    oom_recoveries: int = Field(description="Times the job ran out of memory and was re-planned and resumed")
    progress: Annotated[dict[str, Any], StoredAs(Progress)] | None = Field(
        description="The latest progress report; null until the first one"
    )
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    peak_error_ratio: float | None = Field(description="measured / predicted peak, once measured on a GPU")
    plan: Annotated[dict[str, Any], StoredAs(Plan)] = Field(description="The planner's prediction at submission")
    error: JobError | None
    artifacts: list[Artifact]
    attempts: list[AttemptOut]
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None

    @classmethod
    def of(cls, job: Job, attempts: list[JobAttempt] | None = None) -> JobOut:
        """From the entity, or from a job row and its attempt rows (service/jobs/repository.py `read_job`)."""
        ratio = job.measured_peak_bytes / job.predicted_peak_bytes if job.measured_peak_bytes else None
        artifacts = [
            Artifact(name=a["name"], size_bytes=a["size_bytes"], url=f"/v1/jobs/{job.id}/artifacts/{a['name']}")
            for a in job.artifacts or []
        ]
        error = JobError(code=job.error_code, message=job.error_message) if job.error_code else None
        return cls(
            id=job.id,
            status=job.status,
            tenant_id=job.tenant_id,
            created_by_key_id=job.created_by_key_id,
            cancelled_by_key_id=job.cancelled_by_key_id,
            spec=job.spec,
            requested_spec=job.requested_spec,
            oom_recoveries=job.oom_recoveries,
            progress=job.progress,
            predicted_peak_bytes=job.predicted_peak_bytes,
            measured_peak_bytes=job.measured_peak_bytes,
            peak_error_ratio=ratio,
            plan=job.plan,
            error=error,
            artifacts=artifacts,
            attempts=[AttemptOut.of(attempt) for attempt in (job.attempts if attempts is None else attempts)],
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
        )


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last page")


class EventOut(BaseModel):
    seq: int
    kind: str = Field(description="state | progress | checkpoint | log")
    data: dict[str, Any]
    created_at: UtcDatetime

    @classmethod
    def of(cls, event: JobEvent | Row) -> EventOut:
        return cls(seq=event.seq, kind=event.kind, data=event.data, created_at=event.created_at)


class EventPage(BaseModel):
    data: list[EventOut]
    next_cursor: int = Field(description="Pass as `after` to get only newer events")


class FileOut(BaseModel):
    """An upload, in OpenAI's FileObject shape (id, object, bytes, created_at in unix seconds, filename, purpose,
    status), which the OpenAI SDK reads, plus ftjobs' own fields."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="Unix seconds, as OpenAI gives it")
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["uploaded", "processed"] = Field(description="processed: every row was checked in a format")
    size_bytes: int
    sha256: str
    rows: int | None = None
    validated_format: DatasetFormat | None = Field(None, description="The format every row was checked against, if any")

    @classmethod
    def of(cls, uploaded: UploadedFile) -> FileOut:
        return cls(
            id=uploaded.id,
            bytes=uploaded.size_bytes,
            created_at=int(_as_utc(uploaded.created_at).timestamp()),
            filename=uploaded.filename,
            purpose="fine-tune",
            status="processed" if uploaded.validated_format else "uploaded",
            size_bytes=uploaded.size_bytes,
            sha256=uploaded.sha256,
            rows=uploaded.rows,
            validated_format=uploaded.validated_format,
        )


class FilePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut] = Field(description="Newest first")
    has_more: bool = Field(description="Pass the last file's id as `after` for the next page")
    next_cursor: str | None = Field(description="The same: the id to pass as `after`; null on the last page")


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class CheckpointMetrics(BaseModel):
    step: int
    epoch: float | None = Field(None, description="Epochs of data consumed at this step")
    tokens_seen: int | None = None
    train_loss: float | None = Field(None, description="The per-token loss of this optimizer step")


class CheckpointOut(BaseModel):
    step: int
    attempt: int = Field(description="The attempt that saved it")
    metrics: CheckpointMetrics
    created_at: UtcDatetime
    url: str = Field(
        description="The checkpoint as a tar: for lora/qlora a peft adapter (adapter_config.json, "
        "adapter_model.safetensors); for full/freeze the trained parameters"
    )

    @classmethod
    def of(cls, job_id: str, checkpoint: JobCheckpoint) -> CheckpointOut:
        metrics = CheckpointMetrics.model_validate({"step": checkpoint.step, **(checkpoint.metrics or {})})
        return cls(
            step=checkpoint.step,
            attempt=checkpoint.attempt,
            metrics=metrics,
            created_at=checkpoint.created_at,
            url=f"/v1/jobs/{job_id}/checkpoints/{checkpoint.step}/download",
        )


class CheckpointPage(BaseModel):
    data: list[CheckpointOut] = Field(description="Newest step first: the job's kept checkpoints")


class Readiness(BaseModel):
    """/readyz: a probe's answer, the same body when ready (200) and when not (503)."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="database, broker, storage: ok, or the error that failed it")


class WebhookAttemptOut(BaseModel):
    number: int
    attempted_at: UtcDatetime
    status_code: int | None = Field(
        description="The receiver's HTTP status; null when it gave none (refused, timed out)"
    )
    error: str | None = Field(description="Why the attempt failed; null when the receiver answered 2xx")
    duration_seconds: float


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="The webhook-id header, the same on every attempt: receivers deduplicate by it")
    event_seq: int = Field(description="The event it reports, as GET /v1/jobs/{id}/events numbers it")
    event_type: str = Field(description="job.status_changed | job.checkpoint_saved")
    url: str
    status: str = Field(description="pending | delivered | failed (every attempt used)")
    next_attempt_at: UtcDatetime | None = Field(description="When it is tried next; null once delivered or failed")
    created_at: UtcDatetime
    delivered_at: UtcDatetime | None
    attempts: list[WebhookAttemptOut]

    @classmethod
    def of(cls, delivery: Row, attempts: list[Row]) -> WebhookDeliveryOut:
        return cls(
            id=delivery.id,
            event_seq=delivery.event_seq,
            event_type=delivery.event_type,
            url=delivery.url,
            status=delivery.status,
            created_at=delivery.created_at,
            delivered_at=delivery.delivered_at,
            next_attempt_at=delivery.next_attempt_at if delivery.status == "pending" else None,
            attempts=[
                WebhookAttemptOut(
                    number=a.number,
                    attempted_at=a.attempted_at,
                    status_code=a.status_code,
                    error=a.error,
                    duration_seconds=a.duration_seconds,
                )
                for a in attempts
            ],
        )


class WebhookDeliveryPage(BaseModel):
    data: list[WebhookDeliveryOut]
    next_cursor: int = Field(description="Pass as `after` for the next page (the last delivery's event_seq)")


_ERROR_RATIO = "error = measured / predicted - 1, where predicted is the model's own peak (before any correction)"


class PlannerFamilyAccuracy(BaseModel):
    """The planner on one recipe family and GPU model, over its newest finished GPU jobs."""

    gpu_model: str = Field(description="The GPU model (NVML's name) the jobs ran on")
    family: str = Field(description="The recipe family: method, optimizer, checkpointing, objective, sharding")
    jobs: int = Field(description="How many finished jobs the figures rest on (the newest 200 at most)")
    median_error_ratio: float = Field(description=f"The median error; {_ERROR_RATIO}")
    worst_error_ratio: float = Field(description=f"The error furthest from 0, with its sign; {_ERROR_RATIO}")
    correction_ratio: float | None = Field(
        description="The factor plans of this family on this GPU model get (>= 1); None: none yet, too few jobs "
        "or the model did not under-predict"
    )

    @classmethod
    def of(cls, row: Any) -> PlannerFamilyAccuracy:  # a service.calibration.service.FamilyAccuracy
        return cls(
            gpu_model=row.gpu_model,
            family=row.family,
            jobs=row.accuracy.jobs,
            median_error_ratio=row.accuracy.median_error_ratio,
            worst_error_ratio=row.accuracy.worst_error_ratio,
            correction_ratio=row.correction.ratio if row.correction else None,
        )


class PlannerAccuracy(BaseModel):
    data: list[PlannerFamilyAccuracy]
    min_jobs: int = Field(description="How many finished jobs of a family on a GPU model a correction needs")
