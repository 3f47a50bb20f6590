"""The OpenAI fine-tuning API mapped onto ftjobs: a create request to a JobSpec, and jobs, events, checkpoints
and errors to OpenAI's shapes (service/schemas_openai.py). Pure functions: no database, no HTTP.

The mapping:
  model                                    -> base_model
  training_file                            -> dataset.file_id, read as chat messages (dataset_format messages)
  validation_file                          -> validation_dataset.file_id: the eval loss is taken on it
  method.type dpo                          -> objective dpo on dataset_format openai_preference,
    method.dpo.hyperparameters.beta ("auto": 0.1) -> dpo.beta
  hyperparameters, or the same under method.supervised (or method.dpo).hyperparameters:
    n_epochs ("auto": 3)                   -> training.epochs
    batch_size ("auto": the planner's)     -> training.micro_batch_size (no accumulation)
    learning_rate_multiplier               -> training.learning_rate = 2e-4 x it
  seed (None: drawn now, shown on the job) -> training.seed
  suffix                                   -> output.suffix
  metadata                                 -> metadata
  ftjobs: {...}                            -> merged over all of the above: any other JobSpec field
and a checkpoint at the end of each epoch, the last three kept, as OpenAI keeps them.
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from domain.errors import DomainError
from domain.spec import MAX_SEED, DatasetRef, JobSpec, Objective
from domain.states import JobStatus
from service.errors import InvalidCursor, InvalidSpec, http_status
from service.models import Job, JobCheckpoint
from service.schemas_openai import (
    CheckpointMetricsOut,
    DpoHyperparametersOut,
    DpoOut,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCreate,
    FineTuningJobEvent,
    Hyperparameters,
    HyperparametersOut,
    JobErrorOut,
    MethodOut,
    OpenAIError,
    OpenAIErrorBody,
    SupervisedOut,
)

BASE_LEARNING_RATE = 2e-4  # TrainingOptions' default, LoRA's usual rate: what a multiplier of 1 means
AUTO_EPOCHS = 3  # OpenAI's n_epochs "auto" settles on a few epochs for a small dataset; 3 is its common pick
KEPT_EPOCH_CHECKPOINTS = 3  # OpenAI keeps the last three epochs' checkpoints
# Set from the OpenAI fields: the ftjobs extra may not name them again.
RESERVED_FTJOBS_FIELDS = ("base_model", "dataset", "validation_dataset")

_STATUS = {
    JobStatus.queued: "queued",
    JobStatus.running: "running",
    JobStatus.succeeded: "succeeded",
    JobStatus.failed: "failed",
    JobStatus.cancelled: "cancelled",
    # The cancel is irrevocable: OpenAI's clients stop polling at cancelled. GET /v1/jobs/{id} shows the
    # difference (and the rare job that finishes before its process stops keeps its real outcome).
    JobStatus.cancelling: "cancelled",
}
_EVENT_ID = re.compile(r"ftevent-(\d{1,19})")
_METADATA_PARAM = re.compile(r"metadata\[(.+)\]", re.DOTALL)
_CHECKPOINT_ID = re.compile(r"ftckpt-(job_[0-9a-f]{24})-(\d{1,10})")


# --- the request -------------------------------------------------------------------------------------------


def to_spec(request: FineTuningJobCreate) -> JobSpec:
    """The JobSpec the request asks for; InvalidSpec, naming the field at fault, if it asks for none."""
    hyper = _hyperparameters(request)
    training: dict[str, Any] = {
        "epochs": AUTO_EPOCHS if hyper.n_epochs in (None, "auto") else hyper.n_epochs,
        "micro_batch_size": "auto" if hyper.batch_size in (None, "auto") else hyper.batch_size,
        "learning_rate": BASE_LEARNING_RATE
        * (1 if hyper.learning_rate_multiplier in (None, "auto") else hyper.learning_rate_multiplier),
        "seed": secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
        "checkpoint_every_epoch": True,
        "keep_checkpoints": KEPT_EPOCH_CHECKPOINTS,
    }
    spec: dict[str, Any] = {
        "base_model": request.model,
        "dataset": {"file_id": request.training_file},
        "dataset_format": "messages",
        "method": "qlora",
        "training": training,
        "metadata": request.metadata or {},
    }
    if request.method is not None and request.method.type == "dpo":
        spec.update(objective="dpo", dataset_format="openai_preference")
        beta = getattr(hyper, "beta", None)
        if beta not in (None, "auto"):
            spec["dpo"] = {"beta": beta}
    if request.validation_file is not None:
        spec["validation_dataset"] = {"file_id": request.validation_file}
    if request.suffix is not None:
        spec["output"] = {"suffix": request.suffix}
    extra = request.ftjobs or {}
    reserved = [name for name in RESERVED_FTJOBS_FIELDS if name in extra]
    if reserved:
        raise InvalidSpec(f"ftjobs.{reserved[0]}: set by `model` and `training_file`", param=f"ftjobs.{reserved[0]}")
    try:
        return JobSpec.model_validate(_merged(spec, extra))
    except ValidationError as exc:
        raise InvalidSpec(_summary(exc), param=_param(exc)) from None


def _hyperparameters(request: FineTuningJobCreate) -> Hyperparameters:
    method = request.method
    if method is not None and method.type == "supervised" and method.dpo is not None:
        raise InvalidSpec("method.dpo is for method.type dpo", param="method.dpo")
    if method is not None and method.type == "dpo" and method.supervised is not None:
        raise InvalidSpec("method.supervised is for method.type supervised", param="method.supervised")
    chosen = (method.dpo if method.type == "dpo" else method.supervised) if method else None
    nested = chosen.hyperparameters if chosen else None
    if nested is not None and request.hyperparameters is not None:
        where = f"method.{method.type}.hyperparameters" if method else "method"
        raise InvalidSpec(f"give hyperparameters or {where}, not both", param="hyperparameters")
    return nested or request.hyperparameters or Hyperparameters()


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = (
            _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


def _summary(exc: ValidationError) -> str:
    return "; ".join(f"{_loc(e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors())


def _param(exc: ValidationError) -> str | None:
    loc = exc.errors()[0]["loc"]
    return _loc(loc) if loc else None


def _loc(loc: tuple) -> str:
    """Where a JobSpec error points, named as the request does."""
    names = {"base_model": "model", "dataset": "training_file", "validation_dataset": "validation_file"}
    head = str(loc[0])
    if head in names:
        return names[head]
    return "ftjobs." + ".".join(str(part) for part in loc)


def metadata_filter(query: dict[str, str]) -> dict[str, str]:
    """The `metadata[key]=value` pairs of a list request's query, bounded as a spec's metadata is."""
    malformed = [name for name in query if name.startswith("metadata") and not _METADATA_PARAM.fullmatch(name)]
    if malformed:  # `metadata[]=x` or a bare `metadata=x` filters nothing: refused, not silently ignored
        raise InvalidSpec(f"{malformed[0]!r}: a metadata filter is metadata[key]=value", param="metadata")
    pairs = {match[1]: value for name, value in query.items() if (match := _METADATA_PARAM.fullmatch(name))}
    for key, value in pairs.items():
        if len(key) > 64 or len(value) > 512 or not (key + value).isprintable():
            raise InvalidSpec(
                f"metadata[{key!r}]: keys are up to 64 printable characters, values up to 512", param="metadata"
            )
    return pairs


# --- jobs --------------------------------------------------------------------------------------------------


def _method_out(spec: JobSpec, hyper: HyperparametersOut) -> MethodOut:
    if spec.objective is Objective.sft:
        return MethodOut(type="supervised", supervised=SupervisedOut(hyperparameters=hyper))
    if spec.dpo_options is not None:
        beta = spec.dpo_options.beta
        return MethodOut(type="dpo", dpo=DpoOut(hyperparameters=DpoHyperparametersOut(**hyper.model_dump(), beta=beta)))
    return MethodOut(type=spec.objective.value)


def job_out(job: Job) -> FineTuningJob:
    spec = JobSpec.model_validate(job.spec)
    status = JobStatus(job.status)
    progress = job.progress or {}
    hyper = _hyperparameters_out(spec)
    error = JobErrorOut(code=job.error_code, message=job.error_message or job.error_code) if job.error_code else None
    return FineTuningJob(
        id=job.id,
        created_at=_unix(job.created_at),
        finished_at=_unix(job.finished_at),
        status=_STATUS[status],
        model=spec.base_model,
        organization_id=job.tenant_id,
        fine_tuned_model=fine_tuned_model(job.id, spec) if status is JobStatus.succeeded else None,
        training_file=_file_of(spec.dataset) or "",
        validation_file=_file_of(spec.validation_dataset),
        hyperparameters=hyper,
        method=_method_out(spec, hyper),
        seed=spec.training.seed,
        suffix=spec.output.suffix,
        metadata=spec.metadata,
        error=error,
        trained_tokens=progress.get("tokens_seen"),
        estimated_finish=_estimated_finish(job, status, progress),
        result_files=[],
        integrations=[],
    )


def _file_of(ref: DatasetRef | None) -> str | None:
    """An upload's id; a native job's data-root path."""
    return None if ref is None else ref.file_id or ref.path


def fine_tuned_model(job_id: str, spec: JobSpec) -> str:
    """OpenAI's ft:<base>:<suffix>:<id>; the files are the job's artifacts."""
    parts = ["ft", PurePosixPath(spec.base_model).name, *([spec.output.suffix] if spec.output.suffix else []), job_id]
    return ":".join(parts)


def _hyperparameters_out(spec: JobSpec) -> HyperparametersOut:
    training = spec.training
    batch = training.micro_batch_size
    return HyperparametersOut(
        batch_size=batch * training.gradient_accumulation_steps if isinstance(batch, int) else batch,
        learning_rate_multiplier=training.learning_rate / BASE_LEARNING_RATE,
        n_epochs=training.epochs,
    )


def _estimated_finish(job: Job, status: JobStatus, progress: dict[str, Any]) -> int | None:
    eta = progress.get("eta_seconds")
    if status is not JobStatus.running or eta is None:
        return None
    return int(_utc(job.updated_at).timestamp() + eta)  # the progress was written at updated_at


# --- events ------------------------------------------------------------------------------------------------


def event_cursor(after: str | None) -> int:
    """The seq before which an events page starts: `after` is the last event id of the previous page."""
    if after is None:
        return 2**63 - 1
    match = _EVENT_ID.fullmatch(after)
    if match is None or int(match[1]) > 2**63 - 1:
        raise InvalidCursor(f"no event {after!r} to continue after", param="after")
    return int(match[1])


def event_out(event: Any) -> FineTuningJobEvent:
    """From a job_events row (seq, kind, data, created_at)."""
    data = event.data
    level, kind, message = "info", "message", data.get("message") or event.kind
    if event.kind == "state":
        error = data.get("error") or {}
        message = f"job {data['status']}" + (f": {error.get('message') or error.get('code')}" if error else "")
        level = "error" if data["status"] == "failed" else "info"
    elif event.kind == "progress":
        kind = "metrics"
        loss = data.get("loss")
        message = f"step {data.get('step')}/{data.get('total_steps')}" + (
            f": training loss={loss:.4f}" if isinstance(loss, (int, float)) else ""
        )
    elif event.kind == "checkpoint":
        message = f"checkpoint saved at step {data.get('step')}"
    return FineTuningJobEvent(
        id=f"ftevent-{event.seq}",
        created_at=_unix(event.created_at),
        level=level,
        message=message,
        type=kind,
        data=data,
    )


# --- checkpoints -------------------------------------------------------------------------------------------


def checkpoint_out(job: Job, checkpoint: JobCheckpoint) -> FineTuningJobCheckpoint:
    metrics = checkpoint.metrics or {}
    spec = JobSpec.model_validate(job.spec)
    return FineTuningJobCheckpoint(
        id=checkpoint_id(job.id, checkpoint.step),
        created_at=_unix(checkpoint.created_at),
        fine_tuning_job_id=job.id,
        step_number=checkpoint.step,
        fine_tuned_model_checkpoint=f"{fine_tuned_model(job.id, spec)}:ckpt-step-{checkpoint.step}",
        metrics=CheckpointMetricsOut(step=checkpoint.step, train_loss=metrics.get("train_loss")),
        download_url=f"/v1/jobs/{job.id}/checkpoints/{checkpoint.step}/download",
    )


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id}-{step}"


def checkpoint_cursor(after: str | None) -> int | None:
    """The step a checkpoints page continues below."""
    if after is None:
        return None
    match = _CHECKPOINT_ID.fullmatch(after)
    if match is None:
        raise InvalidCursor(f"no checkpoint {after!r} to continue after", param="after")
    return int(match[2])


# --- errors ------------------------------------------------------------------------------------------------


def openai_error(error: DomainError) -> OpenAIError:
    """The problem in OpenAI's envelope: its detail as the message, its stable code as the code."""
    status = http_status(error)
    if status == 401:
        kind = "authentication_error"
    elif status == 429:
        kind = "rate_limit_error"
    elif status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    param = error.extra.get("param")
    if param is None and error.extra.get("errors"):  # a request FastAPI refused: the first field at fault
        param = ".".join(part for part in error.extra["errors"][0]["loc"] if part not in ("body", "query", "path"))
    return OpenAIError(
        error=OpenAIErrorBody(
            message=error.detail, type=kind, code=error.code, param=param if isinstance(param, str) else None
        )
    )


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _unix(value: datetime | None) -> int | None:
    return None if value is None else int(_utc(value).timestamp())
