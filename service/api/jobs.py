"""/v1/jobs: submit, read, list, cancel, events and artifacts, each within the caller's tenant."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response, StreamingResponse

from planner.spec import JobSpec
from service.api.deps import CallerDep, JobDep, SessionDep, SettingsDep
from service.api.problems import problems
from service.errors import ArtifactNotFound, InvalidCursor
from service.jobs import repository, service
from service.jobs.states import JobStatus
from service.metrics import SubmissionRoute
from service.queue import enqueue_job
from service.schemas import EventOut, EventPage, JobOut, JobPage
from service.storage import CHUNK_BYTES, job_storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
# A job's id leads to its own routes: schemathesis' stateful tests follow these links.
def _job_links(job_id: str) -> dict:
    return {name: {"operationId": operation, "parameters": {"job_id": job_id}}
            for name, operation in (("GetJob", "get_job"), ("CancelJob", "cancel_job"), ("ListEvents", "list_events"))}


_JOB_LINKS = _job_links("$response.body#/id")


def submit_job(spec: JobSpec, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> JobOut:
    job = service.submit_job(session, settings, spec, caller)
    session.commit()  # the row is the truth: once committed, the job is accepted whatever happens to the send
    try:
        enqueue_job(job.id, settings)
    except Exception as exc:  # the broker is down: the reconciler sends the message once the grace period is over
        log.warning("job %s accepted but not yet sent to the broker (%s); the reconciler will send it", job.id, exc)
    return JobOut.of(job)


# Registered by hand for its route class, which counts submissions by outcome (service/metrics.py).
router.add_api_route("", submit_job, methods=["POST"], status_code=201, response_model=JobOut,
                     operation_id="submit_job", route_class_override=SubmissionRoute,
                     responses={201: {"description": "the job, queued", "links": _JOB_LINKS},
                                **problems(413, 415)})


@router.get("", response_model=JobPage, operation_id="list_jobs",
            responses={200: {"description": "a page of jobs", "links": _job_links("$response.body#/data/0/id")},
                       **problems(400)})
def list_jobs(session: SessionDep, caller: CallerDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50, after: str | None = None,
              tenant: Annotated[str | None, Query(max_length=64, description="Admin keys: one tenant's jobs")] = None,
              ) -> JobPage:
    before_seq = None
    if after is not None:
        well_formed = service.ID_PATTERN.fullmatch(after)
        anchor = repository.get_job(session, after, caller.tenant_scope) if well_formed else None
        if anchor is None:
            raise InvalidCursor(f"no job {after!r} to continue after")
        before_seq = anchor.seq
    jobs = repository.list_jobs(session, status=status, limit=limit + 1, before_seq=before_seq,
                                tenant_id=caller.tenant_scope, tenant_name=tenant if caller.admin else None)
    page, more = jobs[:limit], len(jobs) > limit
    return JobPage(data=[JobOut.of(job) for job in page], next_cursor=page[-1].id if more else None)


@router.get("/{job_id}", response_model=JobOut, operation_id="get_job", responses=problems(404))
def get_job(job: JobDep) -> JobOut:
    return JobOut.of(job)


@router.post("/{job_id}/cancel", response_model=JobOut, operation_id="cancel_job", responses=problems(404, 409))
def cancel_job(job: JobDep, session: SessionDep, caller: CallerDep) -> JobOut:
    return JobOut.of(service.cancel_job(session, job.id, caller))


@router.get("/{job_id}/events", response_model=EventPage, operation_id="list_events", responses=problems(404))
def list_events(job: JobDep, session: SessionDep, after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventPage:
    events = repository.list_events(session, job.id, after_seq=after, limit=limit)
    return EventPage(data=[EventOut.of(e) for e in events], next_cursor=events[-1].seq if events else after)


@router.get("/{job_id}/artifacts/{name:path}", response_class=FileResponse, operation_id="download_artifact",
            responses={200: {"description": "the file", "content": {"application/octet-stream": {}}},
                       **problems(404)})
def download_artifact(job: JobDep, name: str, settings: SettingsDep) -> Response:
    # Only names the worker recorded are served, so no path from the URL ever reaches storage unchecked.
    if name not in {artifact["name"] for artifact in job.artifacts or []}:
        raise ArtifactNotFound(f"job {job.id} has no artifact {name!r}")
    storage, key = job_storage(settings), f"jobs/{job.id}/artifacts/{name}"
    filename = name.rsplit("/", 1)[-1]
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            raise ArtifactNotFound(f"artifact {name!r} of job {job.id} is gone from storage")
        return FileResponse(local, filename=filename, media_type="application/octet-stream")
    if not storage.exists(key):
        raise ArtifactNotFound(f"artifact {name!r} of job {job.id} is gone from storage")
    return StreamingResponse(_chunks(storage, key), media_type="application/octet-stream",
                             headers={"Content-Length": str(storage.size(key)),
                                      "Content-Disposition": f'attachment; filename="{filename}"'})


def _chunks(storage, key: str) -> Iterator[bytes]:
    with storage.open_read(key) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
