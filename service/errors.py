"""One error hierarchy. Each error carries its HTTP status and a stable machine-readable code.

The API renders every one of them as RFC 9457 problem+json; the worker stores `code` and the message on
the failed job. `retryable` says whether running the same job again could help.
"""

from __future__ import annotations

from typing import Any


class ProblemError(Exception):
    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"
    retryable: bool = False
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body = {
            "type": f"https://ftjobs.dev/problems/{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class Unauthenticated(ProblemError):
    status, code, title = 401, "unauthenticated", "A valid API key is required"
    headers = {"WWW-Authenticate": "Bearer"}  # RFC 9110: a 401 names the scheme it wants


class RateLimited(ProblemError):
    status, code, title = 429, "rate_limited", "Too many requests for this API key"

    def __init__(self, detail: str, *, retry_after_seconds: int) -> None:
        super().__init__(detail, retry_after_seconds=retry_after_seconds)
        self.headers = {"Retry-After": str(retry_after_seconds)}


class QuotaExceeded(ProblemError):
    status, code, title = 429, "quota_exceeded", "The tenant has too many active jobs"


class BodyTooLarge(ProblemError):
    status, code, title = 413, "body_too_large", "The request body exceeds the size limit"


class MethodNotAllowed(ProblemError):
    status, code, title = 405, "method_not_allowed", "The route does not allow this method"


class RouteNotFound(ProblemError):
    status, code, title = 404, "not_found", "No such route"


class MalformedRequest(ProblemError):
    status, code, title = 400, "malformed_request", "The request cannot be parsed"


class UnsupportedMediaType(ProblemError):
    status, code, title = 415, "unsupported_media_type", "The request body has the wrong content type"


class InvalidSpec(ProblemError):
    status, code, title = 422, "invalid_spec", "The job spec is invalid"


class BaseModelNotFound(ProblemError):
    status, code, title = 422, "base_model_not_found", "The base model cannot be found"


class BaseModelNotAllowed(ProblemError):
    status, code, title = 422, "base_model_not_allowed", "The base model is outside the allowed model roots"


class InvalidDataset(ProblemError):
    status, code, title = 422, "invalid_dataset", "The dataset is malformed"

    def __init__(self, detail: str, *, line: int | None = None, **extra: Any) -> None:
        super().__init__(detail if line is None else f"line {line}: {detail}", line=line, **extra)
        self.line = line


class DatasetNotFound(ProblemError):
    status, code, title = 422, "dataset_not_found", "The dataset cannot be found"


class DatasetPathEscapes(ProblemError):
    status, code, title = 422, "dataset_path_escapes_root", "The dataset path leaves the data root"


class UploadTooLarge(ProblemError):
    status, code, title = 413, "upload_too_large", "The upload exceeds the size limit"


class DatasetTooLarge(ProblemError):
    status, code, title = 422, "dataset_too_large", "The dataset exceeds the size or row limit"


class DatabaseUnavailable(ProblemError):
    status, code, title, retryable = 503, "database_unavailable", "The database connection was lost", True
    headers = {"Retry-After": "1"}  # the transaction did not commit: a retry is safe


class DatabaseBusy(ProblemError):
    status, code, title, retryable = 503, "database_busy", "The database is too busy to answer in time", True
    headers = {"Retry-After": "1"}  # no connection within the pool timeout, or the query hit its statement timeout


class StorageUnavailable(ProblemError):
    status, code, title, retryable = 503, "storage_unavailable", "The storage location cannot be reached", True
    headers = {"Retry-After": "5"}


class DoesNotFit(ProblemError):
    status, code, title = 422, "does_not_fit", "The job does not fit on the GPU"


class UnsupportedArchitecture(ProblemError):
    status, code, title = 422, "unsupported_architecture", "The planner does not model this architecture"


class UnsupportedQuantization(ProblemError):
    status, code, title = 422, "unsupported_quantization", "Pre-quantized checkpoints are not supported"


class InvalidLoraTargets(ProblemError):
    status, code, title = 422, "invalid_lora_targets", "LoRA target_modules name no projection of the model"


class SequenceTooLong(ProblemError):
    status, code, title = 422, "sequence_too_long", "max_seq_length exceeds the model's context length"


class UnsupportedNumGpus(ProblemError):
    status, code, title = 422, "unsupported_num_gpus", "Multi-GPU training is not available on the workers yet"


class UnsupportedSharding(ProblemError):
    status, code, title = 422, "unsupported_sharding", "FSDP sharding is not available on the workers yet"


class JobNotFound(ProblemError):
    status, code, title = 404, "job_not_found", "No such job"


class FileNotFound(ProblemError):
    status, code, title = 404, "file_not_found", "No such file"


class FileInUse(ProblemError):
    status, code, title = 409, "file_in_use", "A job that has not ended still reads this file"


class ArtifactNotFound(ProblemError):
    status, code, title = 404, "artifact_not_found", "No such artifact"


class CheckpointNotFound(ProblemError):
    status, code, title = 404, "checkpoint_not_found", "No such checkpoint"


class InvalidTransition(ProblemError):
    status, code, title = 409, "invalid_transition", "The job is not in a state that allows this"


class InvalidCursor(ProblemError):
    status, code, title = 400, "invalid_cursor", "The pagination cursor is invalid"


class IdempotencyKeyReused(ProblemError):
    status, code, title = 422, "idempotency_key_reused", "The Idempotency-Key was used with another request"


class IdempotencyKeyInUse(ProblemError):
    status, code, retryable = 409, "idempotency_key_in_use", True
    title = "A request with this Idempotency-Key is running"
    headers = {"Retry-After": "1"}


class InvalidIdempotencyKey(ProblemError):
    status, code, title = 400, "invalid_idempotency_key", "The Idempotency-Key header is invalid"


class TooManyStreams(ProblemError):
    status, code, retryable = 503, "too_many_streams", True
    title = "This API process serves its maximum of event streams"
    headers = {"Retry-After": "5"}


# Worker-side outcomes, stored on the failed job as error.code.
class TrainingOutOfMemory(ProblemError):
    code, title, retryable = "out_of_memory", "The job ran out of GPU memory", False


class TrainingCrashed(ProblemError):
    code, title, retryable = "training_crashed", "The training process died", True


class JobCancelled(ProblemError):
    status, code, title = 409, "cancelled", "The job was cancelled"


class JobDrained(ProblemError):
    """The worker is shutting down: the job stopped at a step boundary after its checkpoint, to run elsewhere."""

    code, title, retryable = "drained", "The job was handed back to the queue", True


class LeaseLost(ProblemError):
    """This attempt's lease expired and a newer attempt may own the job: stop without writing anything."""

    code, title, retryable = "lease_lost", "The attempt lost its lease", True


class UnsupportedOnDevice(ProblemError):
    """The spec asks for something this worker's device cannot run (a CUDA-only optimizer on a CPU worker).
    Raised before any model is loaded."""

    status, code, title, retryable = 422, "unsupported_on_device", "This worker's device cannot run the spec", False
