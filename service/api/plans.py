"""/v1/plans: a dry run of the planner."""

from __future__ import annotations

from fastapi import APIRouter

from planner import Plan
from planner.spec import JobSpec
from service.api.deps import CallerDep, SessionDep, SettingsDep
from service.api.problems import problems
from service.planning import plan_spec

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post("", response_model=Plan, operation_id="create_plan", responses=problems(413, 415))
def create_plan(spec: JobSpec, session: SessionDep, settings: SettingsDep, _caller: CallerDep) -> Plan:
    return plan_spec(session, settings, spec, settings.model_root_dirs)
