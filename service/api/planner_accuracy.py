"""/v1/planner/accuracy: how far the planner's peaks were from the measured ones, per recipe family (admin)."""

from __future__ import annotations

from fastapi import APIRouter

from planner.calibration import MIN_JOBS
from service.api.deps import CallerDbDep
from service.api.problems import problems
from service.calibration.service import FamilyAccuracy, accuracy_report
from service.schemas import PlannerAccuracy, PlannerFamilyAccuracy

router = APIRouter(prefix="/v1/planner", tags=["planner"])


@router.get("/accuracy", response_model=PlannerAccuracy, operation_id="get_planner_accuracy", responses=problems(403))
async def get_planner_accuracy(db: CallerDbDep) -> PlannerAccuracy:
    return await db.read(accuracy_report, then=_report)


def _report(rows: list[FamilyAccuracy]) -> PlannerAccuracy:
    return PlannerAccuracy(data=[PlannerFamilyAccuracy.of(row) for row in rows], min_jobs=MIN_JOBS)
