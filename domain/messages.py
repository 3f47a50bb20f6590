"""The messages on the duplex pipe between a worker (worker/execution.py) and its training process
(worker/job_process.py). Plain dicts with a "type", so nothing of ours is unpickled on either side:

  to the worker            {"type": "progress", **Progress fields, process_resident_bytes?, ...}
                           {"type": "checkpoint", "step", "path"}   waits for an ack before training goes on
                           {"type": "log", "message", ...}          becomes a job event as it is
                           {"type": "result", **TrainResult fields, "measured_peak_bytes"}
                           {"type": "error", "code", "message", "retryable", ...}   out_of_memory adds step,
                                                                     device, measured_peak_bytes
  to the training process  {"type": "lease", "deadline"}            the lease was renewed until then (monotonic s)
                           {"type": "drain"}                        checkpoint at the next step, then stop
                           {"type": "ack"}                          the last checkpoint is in storage
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FINAL = ("result", "error")  # the last message of a training process


@dataclass(frozen=True)
class Progress:
    """Reported every spec.training.logging_steps optimizer steps, and at the last step."""

    step: int  # optimizer steps completed
    total_steps: int
    epoch: float  # fractional epochs consumed
    loss: float  # mean loss over the steps since the previous report: per token (sft), per example (preference)
    learning_rate: float  # the LR this step used
    tokens_per_second: float  # non-padding tokens through the model per second of training so far
    eta_seconds: float | None
    memory_allocated_bytes: int | None  # None on the CPU
    memory_reserved_bytes: int | None
    memory_peak_bytes: int | None  # peak reserved since the job started
    eval_loss: float | None = None  # per-token loss on training.validation_fraction's held-out examples
    tokens_seen: int | None = None  # tokens through the model so far, padding excluded (OpenAI's trained_tokens)
    # dpo, kto, orpo since the previous report: chosen_reward, rejected_reward, margin (beta x the policy/reference
    # log-ratio; orpo: beta x the mean token log-probability), accuracy (dpo, orpo), kl (kto), eval_accuracy
    preference: dict[str, float] | None = None


def progress(report: Progress, **extra: Any) -> dict[str, Any]:
    return {"type": "progress", **dataclasses.asdict(report), **extra}


def checkpoint(step: int, path: str) -> dict[str, Any]:
    return {"type": "checkpoint", "step": step, "path": path}


def log(message: str, **data: Any) -> dict[str, Any]:
    return {"type": "log", "message": message, **data}


def result(**fields: Any) -> dict[str, Any]:
    return {"type": "result", **fields}


def error(code: str, message: str, retryable: bool, **data: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, "retryable": retryable, **data}


def lease(deadline: float) -> dict[str, Any]:
    return {"type": "lease", "deadline": deadline}


def drain() -> dict[str, Any]:
    return {"type": "drain"}


def ack() -> dict[str, Any]:
    return {"type": "ack"}
