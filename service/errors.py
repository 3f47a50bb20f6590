"""The API's errors: each carries its HTTP status and a stable machine-readable code.

The API renders every one of them, and every domain error (domain/errors.py: dataset and training outcomes, which
carry no HTTP status), as RFC 9457 problem+json; http_status() gives a domain error its status here.
"""

from __future__ import annotations

from typing import Any

from domain.errors import (
    DatasetNotFound,
    DatasetTooLarge,
    DomainError,
    InvalidDataset,
    JobCancelled,
    UnsupportedOnDevice,
)


class ProblemError(DomainError):
    status: int = 500
    headers: dict[str, str] | None = None


# The status of each domain error that can reach a response.
DOMAIN_STATUS: dict[type[DomainError], int] = {
    InvalidDataset: 422,
    DatasetNotFound: 422,
    DatasetTooLarge: 422,
    UnsupportedOnDevice: 422,
    JobCancelled: 409,
}


def http_status(error: DomainError) -> int:
    if isinstance(error, ProblemError):
        return error.status
    return next((status for cls, status in DOMAIN_STATUS.items() if isinstance(error, cls)), 500)


def to_problem(error: DomainError, instance: str | None = None) -> dict[str, Any]:
    body = {
        "type": f"https://ftjobs.dev/problems/{error.code}",
        "title": error.title,
        "status": http_status(error),
        "detail": error.detail,
        "code": error.code,
    }
    if instance:
        body["instance"] = instance
    body.update(error.extra)
    return body


class Unauthenticated(ProblemError):
    status, code, title = 401, "unauthenticated", "A valid API key is required"
    headers = {"WWW-Authenticate": "Bearer"}  # RFC 9110: a 401 names the scheme it wants


class AdminOnly(ProblemError):
    status, code, title = 403, "admin_only", "This route needs an admin API key"


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


class DatasetPathEscapes(ProblemError):
    status, code, title = 422, "dataset_path_escapes_root", "The dataset path leaves the data root"


class UploadTooLarge(ProblemError):
    status, code, title = 413, "upload_too_large", "The upload exceeds the size limit"


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


class UnsupportedPaddingFree(ProblemError):
    status, code, title = 422, "unsupported_padding_free", "training.padding_free does not apply to this model"


class NotEnoughGpus(ProblemError):
    status, code, title = 422, "not_enough_gpus", "No live worker has that many GPUs"


class UnsupportedSharding(ProblemError):
    status, code, title = 422, "unsupported_sharding", "The workers do not train this combination sharded"


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


class SweepNotFound(ProblemError):
    status, code, title = 404, "sweep_not_found", "No such sweep"


class SweepFinished(ProblemError):
    status, code, title = 409, "sweep_finished", "The sweep has already ended"
