"""/v1/fine_tuning: OpenAI's fine-tuning API, as the official SDK calls it (base_url=<ftjobs>/v1, the tenant's
key as api_key). Jobs are native jobs: created through the same submission as POST /v1/jobs, shaped by
service/openai_compat.py. Errors come in OpenAI's envelope, {"error": {message, type, param, code}}."""

from __future__ import annotations

import functools
from typing import Annotated

from fastapi import APIRouter, Query, Request

from service import openai_compat
from service.api.deps import AuthenticatedDbDep, CallerDbDep, SettingsDep
from service.api.jobs import accept_job
from service.api.problems import HEADERS
from service.jobs import checkpoints, service
from service.metrics import SubmissionRoute
from service.schemas_openai import (
    FineTuningJob,
    FineTuningJobCheckpointPage,
    FineTuningJobCreate,
    FineTuningJobEventPage,
    FineTuningJobPage,
    OpenAIError,
)

PREFIX = "/v1/fine_tuning"
router = APIRouter(prefix=f"{PREFIX}/jobs", tags=["openai"])

_DESCRIPTIONS = {
    400: "an invalid cursor",
    401: "no valid API key",
    404: "no such job, or another tenant's",
    409: "the job's state does not allow this",
    413: "the body exceeds its size limit",
    415: "the body is not JSON",
    422: "invalid input: the request, the model, the file, or a job the planner refuses (code does_not_fit)",
    429: "rate_limit_error (see Retry-After) or quota_exceeded",
    500: "an unexpected error",
    503: "the database or storage is passing through a bad moment (see Retry-After)",
}


def openai_errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI `responses` entries: each an OpenAI error envelope (service/app.py renders them so here)."""
    return {
        status: {
            "model": OpenAIError,
            "description": _DESCRIPTIONS[status],
            **({"headers": HEADERS[status]} if status in HEADERS else {}),
        }
        for status in statuses
    }


# Every route here: the counterpart of service/api/problems.py AUTHENTICATED.
ERRORS = openai_errors(400, 401, 422, 429, 500, 503)
_METADATA_DOC = {
    "parameters": [
        {
            "name": "metadata",
            "in": "query",
            "required": False,
            "style": "deepObject",
            "explode": True,
            "schema": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 512}},
            "description": "metadata[key]=value: only jobs with these metadata values",
        }
    ]
}


async def create_fine_tuning_job(
    request: FineTuningJobCreate, db: AuthenticatedDbDep, settings: SettingsDep
) -> FineTuningJob:
    return await accept_job(openai_compat.to_spec(request), db, settings, then=openai_compat.job_out, answers=200)


router.add_api_route(
    "",
    create_fine_tuning_job,
    methods=["POST"],
    response_model=FineTuningJob,
    operation_id="create_fine_tuning_job",
    route_class_override=SubmissionRoute,
    responses=openai_errors(413, 415),
)


@router.get("", response_model=FineTuningJobPage, operation_id="list_fine_tuning_jobs", openapi_extra=_METADATA_DOC)
async def list_fine_tuning_jobs(
    request: Request,
    db: CallerDbDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> FineTuningJobPage:
    metadata = openai_compat.metadata_filter(dict(request.query_params))
    return await db.read(
        functools.partial(service.list_jobs, metadata=metadata), None, limit, after, None, then=_job_page
    )


def _job_page(result: tuple) -> FineTuningJobPage:
    page, more = result
    return FineTuningJobPage(data=[openai_compat.job_out(job) for job in page], has_more=more)


@router.get(
    "/{job_id}", response_model=FineTuningJob, operation_id="retrieve_fine_tuning_job", responses=openai_errors(404)
)
async def retrieve_fine_tuning_job(job_id: str, db: CallerDbDep) -> FineTuningJob:
    return await db.read(service.get_job, job_id, then=openai_compat.job_out)


@router.post(
    "/{job_id}/cancel",
    response_model=FineTuningJob,
    operation_id="cancel_fine_tuning_job",
    responses=openai_errors(404, 409),
)
async def cancel_fine_tuning_job(job_id: str, db: AuthenticatedDbDep) -> FineTuningJob:
    return await db.write(service.cancel_job, job_id, then=openai_compat.job_out)


@router.get(
    "/{job_id}/events",
    response_model=FineTuningJobEventPage,
    operation_id="list_fine_tuning_events",
    responses=openai_errors(404),
)
async def list_fine_tuning_events(
    job_id: str,
    db: CallerDbDep,
    after: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningJobEventPage:
    before = openai_compat.event_cursor(after)
    return await db.read_rows(
        service.list_events_newest_first, job_id, before, limit + 1, then=functools.partial(_event_page, limit)
    )


def _event_page(limit: int, rows: list) -> FineTuningJobEventPage:
    return FineTuningJobEventPage(
        data=[openai_compat.event_out(row) for row in rows[:limit]], has_more=len(rows) > limit
    )


@router.get(
    "/{job_id}/checkpoints",
    response_model=FineTuningJobCheckpointPage,
    operation_id="list_fine_tuning_checkpoints",
    responses=openai_errors(404),
)
async def list_fine_tuning_checkpoints(
    job_id: str,
    db: CallerDbDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> FineTuningJobCheckpointPage:
    below = openai_compat.checkpoint_cursor(after)
    return await db.read(checkpoints.list_checkpoints, job_id, then=functools.partial(_checkpoint_page, below, limit))


def _checkpoint_page(below: int | None, limit: int, found: tuple) -> FineTuningJobCheckpointPage:
    job, kept = found
    page = [checkpoint for checkpoint in kept if below is None or checkpoint.step < below]
    return FineTuningJobCheckpointPage(
        data=[openai_compat.checkpoint_out(job, c) for c in page[:limit]], has_more=len(page) > limit
    )
