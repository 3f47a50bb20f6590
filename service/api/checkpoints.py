"""/v1/jobs/{id}/checkpoints: a job's kept checkpoints, listed and downloadable (service/jobs/checkpoints.py)."""

from __future__ import annotations

import os
from typing import Annotated

import anyio
from fastapi import APIRouter, Path
from fastapi.responses import FileResponse, Response
from starlette.background import BackgroundTask

from service.api.deps import CallerDbDep, SettingsDep
from service.api.problems import problems
from service.jobs import checkpoints
from service.schemas import CheckpointOut, CheckpointPage

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])


@router.get(
    "/{job_id}/checkpoints", response_model=CheckpointPage, operation_id="list_checkpoints", responses=problems(404)
)
async def list_checkpoints(job_id: str, db: CallerDbDep) -> CheckpointPage:
    return await db.read(checkpoints.list_checkpoints, job_id, then=_page)


def _page(found: tuple) -> CheckpointPage:
    job, kept = found
    return CheckpointPage(data=[CheckpointOut.of(job.id, checkpoint) for checkpoint in kept])


@router.get(
    "/{job_id}/checkpoints/{step}/download",
    response_class=FileResponse,
    operation_id="download_checkpoint",
    responses={
        200: {
            "description": "a tar: the peft adapter (lora/qlora) or the trained parameters",
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        },
        **problems(404),
    },
)
async def download_checkpoint(
    job_id: str, step: Annotated[int, Path(ge=0, le=2**31 - 1)], db: CallerDbDep, settings: SettingsDep
) -> Response:
    storage_key, method = await db.read(checkpoints.find_checkpoint, job_id, step)
    tar = await anyio.to_thread.run_sync(checkpoints.write_tar, settings, storage_key, method)
    return FileResponse(
        tar,
        media_type="application/x-tar",
        filename=f"{job_id}-step-{step}.tar",
        background=BackgroundTask(os.unlink, tar),
    )
