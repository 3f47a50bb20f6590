"""Errors with a stable machine-readable code, raised on both sides of the process boundary.

No HTTP here: the API maps codes to statuses (service/errors.py), the worker stores `code` and the message on the
failed job. `retryable` says whether running the same job again could help.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    code: str = "internal_error"
    title: str = "Internal error"
    retryable: bool = False

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


# ---- datasets: found when the API validates an upload, or when the worker reads it -----------------------------
class InvalidDataset(DomainError):
    code, title = "invalid_dataset", "The dataset is malformed"

    def __init__(self, detail: str, *, line: int | None = None, **extra: Any) -> None:
        super().__init__(detail if line is None else f"line {line}: {detail}", line=line, **extra)
        self.line = line


class DatasetNotFound(DomainError):
    code, title = "dataset_not_found", "The dataset cannot be found"


class DatasetTooLarge(DomainError):
    code, title = "dataset_too_large", "The dataset exceeds the size or row limit"


# ---- training outcomes, stored on the failed job as error.code ---------------------------------------------------
class TrainingOutOfMemory(DomainError):
    code, title, retryable = "out_of_memory", "The job ran out of GPU memory", False


class TrainingCrashed(DomainError):
    code, title, retryable = "training_crashed", "The training process died", True


class JobCancelled(DomainError):
    code, title = "cancelled", "The job was cancelled"


class JobDrained(DomainError):
    """The worker is shutting down: the job stopped at a step boundary after its checkpoint, to run elsewhere."""

    code, title, retryable = "drained", "The job was handed back to the queue", True


class LeaseLost(DomainError):
    """This attempt's lease expired and a newer attempt may own the job: stop without writing anything."""

    code, title, retryable = "lease_lost", "The attempt lost its lease", True


class UnsupportedOnDevice(DomainError):
    """The spec asks for something this worker's device cannot run (a CUDA-only optimizer on a CPU worker).
    Raised before any model is loaded."""

    code, title, retryable = "unsupported_on_device", "This worker's device cannot run the spec", False
