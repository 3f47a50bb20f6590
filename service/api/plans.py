"""/v1/plans: a dry run of the planner."""

from __future__ import annotations

from fastapi import APIRouter

from planner import Plan
from planner.spec import JobSpec
from service.api.deps import SessionDep
from service.planning import plan_spec

router = APIRouter(prefix="/v1/plans", tags=["plans"])


@router.post("", response_model=Plan)
def create_plan(spec: JobSpec, session: SessionDep) -> Plan:
    return plan_spec(session, spec)
