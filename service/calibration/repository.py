"""Every SQL statement about planner measurements. Functions flush; callers commit."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.spec import JobSpec
from planner.calibration import LEARNED_CORRECTION_TERM, MAX_SAMPLES, recipe_family
from service.models import Job, PlannerMeasurement

log = logging.getLogger(__name__)
Sample = tuple[int, int]  # (predicted_peak_bytes, measured_peak_bytes)


@dataclass(frozen=True)
class MeasuredPeak:
    """What the worker measured and on what: everything of a measurement the job row does not already hold."""

    gpu_model: str  # NVML's name of the GPU the job ran on (of its first one, when it had several)
    driver: str | None
    library_versions: dict[str, str]  # the training process's torch, transformers, peft, bitsandbytes
    architecture: str  # config.json's model_type
    measured_peak_bytes: int


def record(session: Session, job_id: str, measured: MeasuredPeak) -> None:
    """One row for a job that just succeeded, in the transaction that records its success. The spec is the one
    that ran (an OOM recovery may have changed it), and the prediction is the model's own: a plan that carried a
    learned correction is stored without it, so corrections never compound."""
    job = session.execute(
        select(Job.tenant_id, Job.spec, Job.plan, Job.predicted_peak_bytes).where(Job.id == job_id)
    ).one()
    try:
        spec = JobSpec.model_validate(job.spec)
    except ValidationError:  # a spec stored by an older release: the success matters more than the sample
        log.warning("job %s: its stored spec no longer validates; no planner measurement recorded", job_id)
        return
    predicted = job.predicted_peak_bytes - int(job.plan.get("breakdown", {}).get(LEARNED_CORRECTION_TERM, 0))
    session.add(
        PlannerMeasurement(
            job_id=job_id,
            tenant_id=job.tenant_id,
            gpu_model=measured.gpu_model,
            driver=measured.driver,
            library_versions=measured.library_versions,
            architecture=measured.architecture,
            method=spec.method.value,
            optimizer=spec.memory.optimizer.value,
            family=recipe_family(spec),
            phase_at_peak=job.plan.get("peak_phase"),
            predicted_peak_bytes=predicted,
            measured_peak_bytes=measured.measured_peak_bytes,
        )
    )
    session.flush()


def samples(session: Session, gpu_model: str, family: str, limit: int = MAX_SAMPLES) -> list[Sample]:
    """The newest `limit` measurements of one (GPU model, family): one range scan of the index."""
    rows = session.execute(
        select(PlannerMeasurement.predicted_peak_bytes, PlannerMeasurement.measured_peak_bytes)
        .where(PlannerMeasurement.gpu_model == gpu_model, PlannerMeasurement.family == family)
        .order_by(PlannerMeasurement.created_at.desc())
        .limit(limit)
    )
    return [(predicted, measured) for predicted, measured in rows]


def samples_by_group(session: Session, limit: int = MAX_SAMPLES) -> dict[tuple[str, str], list[Sample]]:
    """Every (GPU model, family)'s newest `limit` measurements: the ones its correction rests on."""
    newest = func.row_number().over(
        partition_by=(PlannerMeasurement.gpu_model, PlannerMeasurement.family),
        order_by=PlannerMeasurement.created_at.desc(),
    )
    ranked = select(
        PlannerMeasurement.gpu_model,
        PlannerMeasurement.family,
        PlannerMeasurement.predicted_peak_bytes,
        PlannerMeasurement.measured_peak_bytes,
        newest.label("newest"),
    ).subquery()
    rows = session.execute(
        select(ranked.c.gpu_model, ranked.c.family, ranked.c.predicted_peak_bytes, ranked.c.measured_peak_bytes)
        .where(ranked.c.newest <= limit)
        .order_by(ranked.c.gpu_model, ranked.c.family)
    )
    groups: dict[tuple[str, str], list[Sample]] = {}
    for gpu_model, family, predicted, measured in rows:
        groups.setdefault((gpu_model, family), []).append((predicted, measured))
    return groups
