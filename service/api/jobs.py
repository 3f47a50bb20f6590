"""/v1/jobs: submit, read, list, cancel, events and artifacts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response, StreamingResponse

from planner.spec import JobSpec
from service.api.deps import JobDep, SessionDep, SettingsDep
from service.errors import ArtifactNotFound, InvalidCursor
from service.jobs import repository, service
from service.jobs.states import JobStatus
from service.metrics import SubmissionRoute
from service.queue import enqueue_job
from service.schemas import EventOut, EventPage, JobOut, JobPage
from service.storage import CHUNK_BYTES, job_storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def submit_job(spec: JobSpec, session: SessionDep, settings: SettingsDep) -> JobOut:
    job = service.submit_job(session, settings, spec)
    session.commit()  # the row is the truth: once committed, the job is accepted whatever happens to the send
    try:
        enqueue_job(job.id, settings)
    except Exception as exc:  # the broker is down: the reconciler sends the message once the grace period is over
        log.warning("job %s accepted but not yet sent to the broker (%s); the reconciler will send it", job.id, exc)
    return JobOut.of(job)


# Registered by hand for its route class, which counts submissions by outcome (service/metrics.py).
router.add_api_route("", submit_job, methods=["POST"], status_code=201, response_model=JobOut,
                     responses={422: {"description": "invalid spec, missing model or dataset, or does_not_fit"}},
                     route_class_override=SubmissionRoute)


@router.get("", response_model=JobPage)
def list_jobs(session: SessionDep, status: JobStatus | None = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50, after: str | None = None) -> JobPage:
    before_seq = None
    if after is not None:
        anchor = repository.get_job(session, after)
        if anchor is None:
            raise InvalidCursor(f"no job {after} to continue after")
        before_seq = anchor.seq
    jobs = repository.list_jobs(session, status=status, limit=limit + 1, before_seq=before_seq)
    page, more = jobs[:limit], len(jobs) > limit
    return JobPage(data=[JobOut.of(job) for job in page], next_cursor=page[-1].id if more else None)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: JobDep) -> JobOut:
    return JobOut.of(job)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job: JobDep, session: SessionDep) -> JobOut:
    return JobOut.of(service.cancel_job(session, job.id))


@router.get("/{job_id}/events", response_model=EventPage)
def list_events(job: JobDep, session: SessionDep, after: Annotated[int, Query(ge=0)] = 0,
                limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EventPage:
    events = repository.list_events(session, job.id, after_seq=after, limit=limit)
    return EventPage(data=[EventOut.of(e) for e in events], next_cursor=events[-1].seq if events else after)


@router.get("/{job_id}/artifacts/{name:path}", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
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
