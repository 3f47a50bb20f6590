"""The planner learns from finished jobs: a correction per (GPU model, recipe family) from measured peaks.

Every succeeded job on a GPU stores its measured peak beside the peak the model computed for it
(service/calibration/). Once a (GPU model, family) pair has MIN_JOBS such jobs, plan() multiplies the model's peak
by a ratio learned from them and shows the difference as the breakdown's own line, LEARNED_CORRECTION_TERM.

The rule, and why it is conservative:
  - each job gives ratio = measured / predicted (the model's own peak, never an earlier corrected one, so
    corrections do not compound);
  - the correction is the nearest-rank QUANTILE of those ratios: an observed ratio, so it never moves a plan
    further than some job of that family on that GPU actually measured (the spread bounds it), and from
    10 jobs on the one most extreme job in ten no longer decides it;
  - it is never below 1.0: a model that over-predicts keeps its own figure, because the plan must not shrink
    below what the model computes (a shrunken plan is how a job gets admitted and then runs out of memory).
Pure Python, like the rest of planner/.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field

from domain.spec import JobSpec, Method

# Below this many jobs one unusual run (another process on the GPU, a driver's larger context) would set the
# correction for everyone: five is the fewest whose quantile is not simply the latest job.
MIN_JOBS = 5
# The share of the family's jobs the corrected plan covers: the 90th percentile, nearest rank.
QUANTILE = 0.9
# The newest measurements a correction reads: recent drivers and library versions count, old ones age out.
MAX_SAMPLES = 200
LEARNED_CORRECTION_TERM = "learned_correction"


def recipe_family(spec: JobSpec) -> str:
    """The family of recipes whose planning error behaves alike: method (with the quantization's bits for
    qlora), optimizer, gradient checkpointing, objective, and the sharding when sharded. Every part is one of the
    spec's enums, so the set is closed: e.g. "qlora-4bit/paged_adamw_8bit/gc/sft", "full/adamw/no-gc/dpo/zero3"."""
    method = spec.method.value
    if spec.method is Method.qlora:
        bits = spec.quantization.bits if spec.quantization else 4  # QuantizationOptions' default
        method = f"{method}-{bits}bit"
    parts = [
        method,
        spec.memory.optimizer.value,
        "gc" if spec.memory.gradient_checkpointing else "no-gc",
        spec.objective.value,
    ]
    sharding = spec.resources.effective_sharding
    if sharding is not None:
        parts.append(sharding.value)
    return "/".join(parts)


def error_ratio(predicted_bytes: int, measured_bytes: int) -> float:
    """The planner's error on one job: measured / predicted - 1 (0.05: it measured 5% more than predicted)."""
    return measured_bytes / predicted_bytes - 1


@dataclass(frozen=True, slots=True)
class Correction:
    """A learned correction: multiply the model's peak by `ratio` (>= 1) for `family` on `gpu_model`."""

    ratio: float
    jobs: int
    gpu_model: str
    family: str


def correction(samples: Sequence[tuple[int, int]], gpu_model: str, family: str) -> Correction | None:
    """From (predicted, measured) peak bytes of finished jobs: None below MIN_JOBS, or when the model did not
    under-predict (the quantile is <= 1, and a plan never shrinks)."""
    ratios = sorted(measured / predicted for predicted, measured in samples if predicted > 0 and measured > 0)
    if len(ratios) < MIN_JOBS:
        return None
    ratio = ratios[math.ceil(QUANTILE * len(ratios)) - 1]  # nearest rank: one of the observed ratios
    if ratio <= 1.0:
        return None
    return Correction(ratio=ratio, jobs=len(ratios), gpu_model=gpu_model, family=family)


@dataclass(frozen=True, slots=True)
class Accuracy:
    """How far the model's peak was from the measured one, over a family's jobs on one GPU model."""

    jobs: int
    median_error_ratio: float
    worst_error_ratio: float  # the largest |error|, with its sign


def accuracy(samples: Sequence[tuple[int, int]]) -> Accuracy | None:
    errors = [error_ratio(predicted, measured) for predicted, measured in samples if predicted > 0]
    if not errors:
        return None
    return Accuracy(len(errors), statistics.median(errors), max(errors, key=abs))


class LearnedCorrection(BaseModel):
    """The correction a plan carries: what it rests on, and the peak before it."""

    ratio: float = Field(description="peak_vram_bytes is the model's peak times this ratio (>= 1)")
    jobs: int = Field(description="How many finished jobs of this family on this GPU model it rests on")
    gpu_model: str = Field(description="The GPU model the jobs ran on (NVML's name)")
    family: str = Field(description="The recipe family: method, optimizer, checkpointing, objective, sharding")
    model_peak_vram_bytes: int = Field(description="The peak the model computes, before the correction")


__all__ = [
    "LEARNED_CORRECTION_TERM",
    "MAX_SAMPLES",
    "MIN_JOBS",
    "Accuracy",
    "Correction",
    "LearnedCorrection",
    "accuracy",
    "correction",
    "error_ratio",
    "recipe_family",
]
