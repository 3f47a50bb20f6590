"""Planning a spec against the GPU it would run on."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.orm import Session

from domain.spec import JobSpec
from planner import Plan, plan
from planner.scope import PlanRefused
from service.base_models import locate_for_planning
from service.calibration.service import correction_for
from service.errors import InvalidLoraTargets, InvalidSpec, ProblemError, SequenceTooLong, UnsupportedPaddingFree
from service.gpus import live_gpus
from service.metrics import PLANNER_DURATION
from service.models import RegisteredGpu
from service.settings import Settings
from service.tenancy.keys import Caller

GIB = 1024**3


def gpu_capacity_bytes(gpus: list[RegisteredGpu], spec: JobSpec) -> int | None:
    """The spec's own GPU size if given, else the largest GPU a live worker registered, else unknown."""
    if spec.resources.gpu_memory_gib is not None:
        return int(spec.resources.gpu_memory_gib * GIB)
    return gpus[0].total_memory_bytes if gpus else None


def gpus_per_worker(gpus: list[RegisteredGpu]) -> dict[str, int]:
    """Each live GPU worker's GPU count (workers without a GPU register none)."""
    per_worker: dict[str, int] = {}
    for gpu in gpus:
        per_worker[gpu.worker_hostname] = per_worker.get(gpu.worker_hostname, 0) + 1
    return per_worker


def plan_spec(session: Session | None, settings: Settings, spec: JobSpec, model_roots: list[Path] | None) -> Plan:
    """`model_roots`: where the model may be read (the API's roots); None plans any local path (the CLI, which has
    no database: no live GPUs, and no learned correction)."""
    located = locate_for_planning(spec.base_model, model_roots)
    gpus = live_gpus(session, settings) if session is not None else []  # one query for all three below
    capacity = gpu_capacity_bytes(gpus, spec)
    max_gpus = max(gpus_per_worker(gpus).values(), default=1)  # how far sharding suggestions may go
    learned = correction_for(session, gpus, spec) if session is not None else None
    with PLANNER_DURATION.time():  # the planner alone, not the model lookup or the GPU query
        try:
            return plan(
                spec,
                located,
                capacity,
                max_num_gpus=max_gpus,
                allocator_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                correction=learned,
            )
        except PlanRefused as refused:
            raise _refusal(refused) from refused


def plan_for(session: Session, settings: Settings, spec: JobSpec, caller: Caller) -> Plan:
    """A dry run for any authenticated caller: the model may be read only inside the API's model roots."""
    return plan_spec(session, settings, spec, settings.model_root_dirs)


_REFUSALS: dict[str, type[ProblemError]] = {
    "invalid_lora_targets": InvalidLoraTargets,
    "sequence_too_long": SequenceTooLong,
    "unsupported_padding_free": UnsupportedPaddingFree,
}


def _refusal(refused: PlanRefused) -> ProblemError:
    """The first problem's code leads; every problem is listed."""
    error = _REFUSALS.get(refused.code, InvalidSpec)
    return error(str(refused), problems=[{"code": p.code, "detail": p.detail} for p in refused.problems])
