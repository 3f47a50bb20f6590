"""/v1/sweeps: start, list, read and cancel hyperparameter sweeps, within the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import AuthenticatedDbDep, CallerDbDep, SettingsDep
from service.api.problems import problems
from service.sweeps import service
from service.sweeps.request import SweepRequest
from service.sweeps.schemas import SweepOut, SweepPage

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])
_LINKS = {
    name: {"operationId": operation, "parameters": {"sweep_id": "$response.body#/id"}}
    for name, operation in (("GetSweep", "get_sweep"), ("CancelSweep", "cancel_sweep"))
}


@router.post(
    "",
    status_code=201,
    response_model=SweepOut,
    operation_id="create_sweep",
    responses={201: {"description": "the sweep, running", "links": _LINKS}, **problems(413, 415)},
)
async def create_sweep(request: SweepRequest, db: AuthenticatedDbDep, settings: SettingsDep) -> SweepOut:
    """The workers' driver queues its first trials within one reconcile interval."""
    return await db.write(service.create_sweep, settings, request, then=SweepOut.of, answers=201)


@router.get("", response_model=SweepPage, operation_id="list_sweeps", responses=problems(400))
async def list_sweeps(
    db: CallerDbDep, limit: Annotated[int, Query(ge=1, le=200)] = 50, after: str | None = None
) -> SweepPage:
    """The caller's sweeps (an admin key's: every tenant's), newest first, each with its trials counted by state."""
    return await db.read(service.list_sweeps, limit, after, then=SweepPage.of)


@router.get("/{sweep_id}", response_model=SweepOut, operation_id="get_sweep", responses=problems(404))
async def get_sweep(sweep_id: str, db: CallerDbDep) -> SweepOut:
    return await db.read(service.get_sweep, sweep_id, then=SweepOut.of)


@router.post("/{sweep_id}/cancel", response_model=SweepOut, operation_id="cancel_sweep", responses=problems(404, 409))
async def cancel_sweep(sweep_id: str, db: AuthenticatedDbDep) -> SweepOut:
    """Cancels the running trials' jobs; the sweep is cancelling until the driver has told optuna."""
    return await db.write(service.cancel_sweep, sweep_id, then=SweepOut.of)
