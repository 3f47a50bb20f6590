"""The planner's learned correction for a spec about to be planned, and the accuracy report behind
GET /v1/planner/accuracy and the ftjobs_planner_error_ratio gauge."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from domain.spec import JobSpec
from planner import calibration
from planner.calibration import Accuracy, Correction
from service.calibration import repository
from service.errors import AdminOnly
from service.models import RegisteredGpu
from service.tenancy.keys import Caller

GIB = 1024**3
# A spec's gpu_memory_gib names a size, not a model: a live GPU within this share of it is taken to be the one
# meant ("80" for an H100 80GB, which NVML reports as 79.6 GiB).
SIZE_TOLERANCE = 0.05


def planned_gpu_model(gpus: list[RegisteredGpu], spec: JobSpec) -> str | None:
    """The GPU model the spec is planned against: the largest live GPU's, as planning.gpu_capacity_bytes takes
    its size; with resources.gpu_memory_gib, a live GPU of about that size. None when no live GPU matches: a size
    with no GPU model behind it has no measurements that speak for it, so the model's figure stands alone."""
    wanted_gib = spec.resources.gpu_memory_gib
    if wanted_gib is None:
        return gpus[0].name if gpus else None
    wanted = wanted_gib * GIB
    return next((gpu.name for gpu in gpus if abs(gpu.total_memory_bytes - wanted) <= SIZE_TOLERANCE * wanted), None)


def correction_for(session: Session, gpus: list[RegisteredGpu], spec: JobSpec) -> Correction | None:
    """One indexed query, bounded to the newest measurements; only GPU workers record them, so a CPU worker's
    resident memory never corrects a GPU plan."""
    gpu_model = planned_gpu_model(gpus, spec)
    if gpu_model is None:
        return None
    family = calibration.recipe_family(spec)
    return calibration.correction(repository.samples(session, gpu_model, family), gpu_model, family)


@dataclass(frozen=True)
class FamilyAccuracy:
    gpu_model: str
    family: str
    accuracy: Accuracy
    correction: Correction | None


def accuracy_by_family(session: Session) -> list[FamilyAccuracy]:
    """Every (GPU model, family) with measurements, over the same newest rows its correction reads."""
    out = []
    for (gpu_model, family), samples in repository.samples_by_group(session).items():
        measured = calibration.accuracy(samples)
        if measured is not None:
            out.append(FamilyAccuracy(gpu_model, family, measured, calibration.correction(samples, gpu_model, family)))
    return out


def accuracy_report(session: Session, *, caller: Caller) -> list[FamilyAccuracy]:
    """Measurements span every tenant's jobs, so only an admin key reads them."""
    if not caller.admin:
        raise AdminOnly("the planner's accuracy spans every tenant's jobs: it needs an admin key")
    return accuracy_by_family(session)
