"""/v1/jobs: submit, read, list, cancel, events and artifacts (one by one or as a tar), each within the caller's
tenant."""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy import Row

from domain.spec import JobSpec
from domain.states import JobStatus
from service.api.deps import AuthenticatedDbDep, CallerDbDep, SettingsDep
from service.api.problems import problems
from service.api.streams import EVENT_STREAM, event_stream, wants_stream
from service.archives import archive_bytes, archive_chunks, artifact_members
from service.errors import ArtifactNotFound
from service.jobs import service
from service.metrics import SubmissionRoute
from service.models import Job
from service.queue import enqueue_job
from service.schemas import EventOut, EventPage, JobOut, JobPage
from service.settings import Settings
from service.storage import CHUNK_BYTES, job_storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


# A job's id leads to its own routes: schemathesis' stateful tests follow these links.
def _job_links(job_id: str) -> dict:
    return {
        name: {"operationId": operation, "parameters": {"job_id": job_id}}
        for name, operation in (("GetJob", "get_job"), ("CancelJob", "cancel_job"), ("ListEvents", "list_events"))
    }


_JOB_LINKS = _job_links("$response.body#/id")


async def submit_job(spec: JobSpec, db: AuthenticatedDbDep, settings: SettingsDep) -> JobOut:
    return await accept_job(spec, db, settings, then=JobOut.of, answers=201)


async def accept_job(
    spec: JobSpec, db: AuthenticatedDbDep, settings: SettingsDep, *, then: Callable[[Job], Any], answers: int
) -> Any:
    """Submit and send: every route that creates a job (this one, the OpenAI one) comes here; `then` shapes the
    job for its route's response, which the route answers with status `answers`."""
    # The row is the truth: once its transaction has committed, the job is accepted whatever happens to the send.
    # With an Idempotency-Key, `answers` is recorded with the job, in its transaction (service/idempotency/layer.py).
    job = await db.write(service.submit_job, settings, spec, then=then, answers=answers)
    try:
        await anyio.to_thread.run_sync(enqueue_job, job.id, settings)
    except Exception as exc:  # the broker is down: the reconciler sends the message once the grace period is over
        log.warning("job %s accepted but not yet sent to the broker (%s); the reconciler will send it", job.id, exc)
    return job


# Registered by hand for its route class, which counts submissions by outcome (service/metrics.py).
router.add_api_route(
    "",
    submit_job,
    methods=["POST"],
    status_code=201,
    response_model=JobOut,
    operation_id="submit_job",
    route_class_override=SubmissionRoute,
    responses={201: {"description": "the job, queued", "links": _JOB_LINKS}, **problems(413, 415)},
)


@router.get(
    "",
    response_model=JobPage,
    operation_id="list_jobs",
    responses={
        200: {"description": "a page of jobs", "links": _job_links("$response.body#/data/0/id")},
        **problems(400),
    },
)
async def list_jobs(
    db: CallerDbDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    after: str | None = None,
    tenant: Annotated[str | None, Query(max_length=64, description="Admin keys: one tenant's jobs")] = None,
) -> JobPage:
    return await db.read(service.list_jobs, status, limit, after, tenant, then=_job_page)


def _job_page(result: tuple[list[Job], bool]) -> JobPage:
    page, more = result
    return JobPage(data=[JobOut.of(job) for job in page], next_cursor=page[-1].id if more else None)


@router.get("/{job_id}", response_model=JobOut, operation_id="get_job", responses=problems(404))
async def get_job(job_id: str, db: CallerDbDep) -> JobOut:
    return await db.read_rows(service.read_job, job_id, then=_job_out)


def _job_out(read: tuple) -> JobOut:
    job, attempts = read
    return JobOut.of(job, attempts)


@router.post("/{job_id}/cancel", response_model=JobOut, operation_id="cancel_job", responses=problems(404, 409))
async def cancel_job(job_id: str, db: AuthenticatedDbDep) -> JobOut:
    return await db.write(service.cancel_job, job_id, then=JobOut.of)


_STREAM_DOC = {
    "description": "With Accept: text/event-stream: each event as an SSE message (id: its seq, event: its "
    "kind, data: the event as JSON), until the job has ended and its last event is sent",
    "schema": {"type": "string"},
}


@router.get(
    "/{job_id}/events",
    response_model=EventPage,
    operation_id="list_events",
    responses={
        200: {
            "description": "a page of events, or their stream (Accept: text/event-stream)",
            "content": {EVENT_STREAM: _STREAM_DOC},
        },
        **problems(404),
    },
)
async def list_events(
    request: Request,
    job_id: str,
    db: CallerDbDep,
    settings: SettingsDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[
        int | None,
        Header(ge=0, le=2**63 - 1, description=("Streams: resume after this seq (sent by a reconnecting EventSource)")),
    ] = None,
) -> EventPage:
    if wants_stream(request.headers.get("accept")):
        return await event_stream(db, settings, request.app.state.event_streams, job_id, max(after, last_event_id or 0))
    return await db.read_rows(service.list_events, job_id, after, limit, then=functools.partial(_event_page, after))


def _event_page(after: int, events: list[Row]) -> EventPage:
    return EventPage(data=[EventOut.of(e) for e in events], next_cursor=events[-1].seq if events else after)


@router.get(
    "/{job_id}/artifacts.tar",
    response_class=StreamingResponse,
    operation_id="download_artifacts",
    responses={
        200: {
            "description": "every artifact of the job, by its name, in one tar archive",
            "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
        },
        **problems(404),
    },
)
async def download_artifacts(job_id: str, db: CallerDbDep, settings: SettingsDep) -> Response:
    job_id, names = await db.read(service.get_artifacts_job, job_id, then=_id_and_artifact_names)
    return await anyio.to_thread.run_sync(_archive_response, job_id, names, settings)


def _id_and_artifact_names(job: Job) -> tuple[str, list[str]]:
    return job.id, [artifact["name"] for artifact in job.artifacts]


def _archive_response(job_id: str, names: list[str], settings: Settings) -> Response:
    storage = job_storage(settings)
    members = artifact_members(storage, job_id, names)
    return StreamingResponse(
        archive_chunks(storage, members),
        media_type="application/x-tar",
        headers={
            "Content-Length": str(archive_bytes(members)),
            "Content-Disposition": f'attachment; filename="{job_id}-artifacts.tar"',
        },
    )


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    operation_id="download_artifact",
    responses={200: {"description": "the file", "content": {"application/octet-stream": {}}}, **problems(404)},
)
async def download_artifact(job_id: str, name: str, db: CallerDbDep, settings: SettingsDep) -> Response:
    job_id = await db.read(service.get_artifact_job, job_id, name, then=operator.attrgetter("id"))
    return await anyio.to_thread.run_sync(_artifact_response, job_id, name, settings)


def _artifact_response(job_id: str, name: str, settings: Settings) -> Response:
    storage, key = job_storage(settings), f"jobs/{job_id}/artifacts/{name}"
    filename = name.rsplit("/", 1)[-1]
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            raise ArtifactNotFound(f"artifact {name!r} of job {job_id} is gone from storage")
        return FileResponse(local, filename=filename, media_type="application/octet-stream")
    if not storage.exists(key):
        raise ArtifactNotFound(f"artifact {name!r} of job {job_id} is gone from storage")
    return StreamingResponse(
        _chunks(storage, key),
        media_type="application/octet-stream",
        headers={"Content-Length": str(storage.size(key)), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _chunks(storage, key: str) -> Iterator[bytes]:
    with storage.open_read(key) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
