"""The job state machine: the one table of allowed transitions."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# to-state -> the states it may be entered from. A transition is a guarded UPDATE ... WHERE status IN (...),
# so two workers (or a worker and a cancel) can never both win.
ALLOWED_FROM: dict[JobStatus, frozenset[JobStatus]] = {
    # Back to the queue as a new attempt: its worker drained or died, or its lease expired.
    JobStatus.queued: frozenset({JobStatus.running}),
    JobStatus.running: frozenset({JobStatus.queued}),
    JobStatus.cancelling: frozenset({JobStatus.running}),
    # A job that finishes while its cancel is on the way keeps its real outcome.
    JobStatus.succeeded: frozenset({JobStatus.running, JobStatus.cancelling}),
    JobStatus.failed: frozenset({JobStatus.queued, JobStatus.running, JobStatus.cancelling}),
    JobStatus.cancelled: frozenset({JobStatus.queued, JobStatus.running, JobStatus.cancelling}),
}
