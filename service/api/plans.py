"""/v1/plans: a dry run of the planner."""

from __future__ import annotations

from fastapi import APIRouter

from domain.spec import JobSpec
from planner import Plan
from service.api.deps import AuthenticatedDbDep, SettingsDep
from service.api.problems import problems
from service.planning import plan_for

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post("", response_model=Plan, operation_id="create_plan", responses=problems(413, 415))
async def create_plan(spec: JobSpec, db: AuthenticatedDbDep, settings: SettingsDep) -> Plan:
    return await db.read(plan_for, settings, spec)
