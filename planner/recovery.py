"""What a job that ran out of memory anyway runs next: the cheapest change that keeps its effective batch, re-planned
against the peak the failed attempt measured.

The ladder, cheapest first (none changes which rows a step trains on, so the new attempt resumes the old one's
checkpoint and its loss curve goes on where it stopped):
  1. a smaller micro-batch, the accumulation raised to match (the largest divisor of micro_batch_size that fits:
     halving when it is even);
  2. gradient checkpointing, then the fused (chunked) loss, when off: compute traded for activation memory;
  3. the paged AdamW 8-bit, from AdamW 8-bit: the same states, which the driver pages out under pressure.

The planner was wrong once already, so each candidate's predicted peak is scaled by how far the failed attempt's
measured peak passed its prediction (never below 1) before it is compared with the GPU; the first candidate that
fits wins. With no GPU to compare against (a CPU worker), or when none fits even so, the first rung is taken: the
next out-of-memory error, if any, climbs further, up to the worker's max_oom_recoveries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from domain.spec import JobSpec, Optimizer
from planner import policy
from planner.core import WORKER, Plan, Recipe
from planner.plan import plan
from planner.shapes import ModelShape


@dataclass(frozen=True)
class Recovery:
    spec: JobSpec
    plan: Plan
    changes: dict[str, list[Any]]  # dotted spec field -> [before, after]
    description: str


def recover(
    spec: JobSpec,
    shape: ModelShape,
    gpu_memory_bytes: int | None,
    measured_peak_bytes: int | None = None,
    predicted_peak_bytes: int | None = None,
    *,
    recipe: Recipe = WORKER,
) -> Recovery | None:
    """The recovery to run, or None when no rung is left (micro_batch_size 1, checkpointing, the fused loss and a
    paged optimizer already on). `measured_peak_bytes`: the device's peak when the attempt failed (None on a CPU)."""
    underestimate = 1.0
    if measured_peak_bytes and predicted_peak_bytes:
        underestimate = max(1.0, measured_peak_bytes / predicted_peak_bytes)
    first = None
    for changes in ladder(spec):
        candidate = changed(spec, changes)
        replanned = plan(candidate, shape, gpu_memory_bytes, recipe=recipe, suggest=False)
        recovery = Recovery(candidate, replanned, changes, describe(changes))
        first = first or recovery
        if replanned.gpu_memory_bytes is None:
            return recovery
        if replanned.peak_vram_bytes * underestimate + replanned.safety_margin_bytes <= replanned.gpu_memory_bytes:
            return recovery
    return first


def ladder(spec: JobSpec) -> list[dict[str, list[Any]]]:
    """Each rung's changes, cheapest first."""
    training, memory = spec.training, spec.memory
    micro_batch, accumulation = training.micro_batch_size, training.gradient_accumulation_steps
    assert isinstance(micro_batch, int), "micro_batch_size 'auto' is resolved at submission"
    rungs: list[dict[str, list[Any]]] = [
        {
            "training.micro_batch_size": [micro_batch, smaller],
            "training.gradient_accumulation_steps": [accumulation, accumulation * (micro_batch // smaller)],
        }
        for smaller in range(micro_batch - 1, 0, -1)
        if micro_batch % smaller == 0
    ]
    if not memory.gradient_checkpointing:
        rungs.append({"memory.gradient_checkpointing": [False, True]})
    if not policy.fused_loss_enabled(spec):
        rungs.append({"memory.fused_loss": [memory.fused_loss, True]})
    if memory.optimizer is Optimizer.adamw_8bit:
        rungs.append({"memory.optimizer": [Optimizer.adamw_8bit.value, Optimizer.paged_adamw_8bit.value]})
    return rungs


def describe(changes: dict[str, list[Any]]) -> str:
    text = ", ".join(f"{field.split('.')[-1]} {before} -> {after}" for field, (before, after) in changes.items())
    if "training.micro_batch_size" in changes:
        rows = changes["training.micro_batch_size"][0] * changes["training.gradient_accumulation_steps"][0]
        text += f" (the effective batch stays {rows} rows per rank)"
    return text


def changed(spec: JobSpec, changes: dict[str, list[Any]]) -> JobSpec:
    """The spec with the changes applied, validated again as a whole."""
    document = spec.model_dump(mode="json")
    for field, (_, after) in changes.items():
        section, name = field.split(".")
        document[section][name] = after
    return JobSpec.model_validate(document)
