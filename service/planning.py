"""Planning a spec against the GPU it would run on."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from planner import ModelShape, Plan, plan
from planner.spec import JobSpec
from service.base_models import locate_for_planning
from service.errors import InvalidSpec
from service.jobs import repository
from service.metrics import PLANNER_DURATION

GIB = 1024**3


def gpu_capacity_bytes(session: Session | None, spec: JobSpec) -> int | None:
    """The spec's own GPU size if given, else the largest GPU a worker registered, else unknown."""
    if spec.resources.gpu_memory_gib is not None:
        return int(spec.resources.gpu_memory_gib * GIB)
    if session is None:
        return None
    gpus = repository.list_gpus(session)
    return gpus[0].total_memory_bytes if gpus else None


def plan_spec(session: Session | None, spec: JobSpec, model_roots: list[Path] | None) -> Plan:
    """`model_roots`: where the model may be read (the API's roots); None plans any local path (the CLI)."""
    located, capacity = locate_for_planning(spec.base_model, model_roots), gpu_capacity_bytes(session, spec)
    with PLANNER_DURATION.time():  # the planner alone, not the model lookup or the GPU query
        return plan(spec, located, capacity)
