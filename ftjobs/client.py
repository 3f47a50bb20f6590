"""A small typed client of the native /v1 API, the one the CLI uses for every call.

It needs httpx and pydantic only, never the server's packages. Every method returns a model (or None) and
raises one of two errors: ApiError for an answer that is an error (its problem+json code, detail and status),
ServerUnreachable when no answer came at all. Each POST carries an Idempotency-Key, fresh per call and the same
across this client's own retries, so a retry after a dropped connection cannot create a second job.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_DELAYS_SECONDS = (0.5, 1.0)  # after a transport error; each POST keeps its Idempotency-Key throughout
CHUNK_BYTES = 1024 * 1024


class ApiError(Exception):
    """The server answered with an error: `code` and `detail` from its problem+json body."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        self.code = str(problem.get("code") or f"http_{status}")
        self.detail = str(problem.get("detail") or problem.get("title") or "")
        super().__init__(f"{self.code}: {self.detail}")


class ServerUnreachable(Exception):
    """No answer: nothing listens at the URL, the connection dropped, or the server did not answer in time."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"cannot reach the ftjobs server at {url}: {reason}")


class _Model(BaseModel):
    # Fields the server adds later are kept (and printed by --json), never refused.
    model_config = ConfigDict(extra="allow")


class JobError(_Model):
    code: str
    message: str | None = None


class Artifact(_Model):
    name: str
    size_bytes: int
    url: str


class Job(_Model):
    id: str
    status: str
    spec: dict[str, Any]
    progress: dict[str, Any] | None = None
    predicted_peak_bytes: int | None = None
    error: JobError | None = None
    artifacts: list[Artifact] = []
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL


class JobPage(_Model):
    data: list[Job]
    next_cursor: str | None = None


class Event(_Model):
    seq: int
    kind: str
    data: dict[str, Any]
    created_at: datetime


class EventPage(_Model):
    data: list[Event]
    next_cursor: int


class File(_Model):
    id: str
    filename: str
    # `bytes` and a unix `created_at` are what the OpenAI-shaped file object carries on the same routes.
    size_bytes: int = Field(validation_alias=AliasChoices("size_bytes", "bytes"))
    created_at: datetime
    rows: int | None = None
    validated_format: str | None = None


class FilePage(_Model):
    data: list[File]
    next_cursor: str | None = None


class SweepTrial(_Model):
    number: int
    state: str  # queued | running | complete | pruned | failed
    job_id: str | None = None
    params: dict[str, Any]
    value: float | None = None
    predicted_peak_bytes: int | None = None
    pruned_reason: str | None = None


class Sweep(_Model):
    id: str
    status: str  # running | cancelling | succeeded | cancelled | failed
    metric: str
    direction: str
    n_trials: int
    parallelism: int
    trials: list[SweepTrial] = []
    best_trial: SweepTrial | None = None
    created_at: datetime
    finished_at: datetime | None = None


class Client:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_seconds: float = 30) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_seconds, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    # --- jobs ---------------------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any]) -> Job:
        return Job.model_validate(self._json("POST", "/v1/jobs", json=spec))

    def job(self, job_id: str) -> Job:
        return Job.model_validate(self._json("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, *, status: str | None = None, limit: int = 50, after: str | None = None) -> JobPage:
        params = {"status": status, "limit": limit, "after": after}
        return JobPage.model_validate(self._json("GET", "/v1/jobs", params=_present(params)))

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._json("POST", f"/v1/jobs/{job_id}/cancel"))

    # --- sweeps -------------------------------------------------------------------------------------------

    def create_sweep(self, request: dict[str, Any]) -> Sweep:
        return Sweep.model_validate(self._json("POST", "/v1/sweeps", json=request))

    def sweep(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(self._json("GET", f"/v1/sweeps/{sweep_id}"))

    def cancel_sweep(self, sweep_id: str) -> Sweep:
        return Sweep.model_validate(self._json("POST", f"/v1/sweeps/{sweep_id}/cancel"))

    def events(self, job_id: str, *, after: int = 0, limit: int = 100) -> EventPage:
        # A page of JSON, said outright: the same route may also stream Server-Sent Events to who asks for them.
        return EventPage.model_validate(
            self._json(
                "GET",
                f"/v1/jobs/{job_id}/events",
                params={"after": after, "limit": limit},
                headers={"Accept": "application/json"},
            )
        )

    def follow_events(self, job_id: str, *, after: int = 0, poll_seconds: float = 1.0) -> Iterator[Event]:
        """Every event after `after`, as it comes, until the job has ended and its last event is out."""
        while True:
            page = self.events(job_id, after=after, limit=1000)
            yield from page.data
            after = page.next_cursor
            if page.data:
                continue  # drain what is there before asking for the status again
            if self.job(job_id).ended:
                yield from self.events(job_id, after=after, limit=1000).data  # any written just before it ended
                return
            time.sleep(poll_seconds)

    def download(self, job_id: str, name: str, target: Path) -> Path:
        return self._download(f"/v1/jobs/{job_id}/artifacts/{name}", target)

    def download_artifacts(self, job_id: str, target: Path) -> Path:
        """Every artifact of the job in one tar archive, written to `target`."""
        return self._download(f"/v1/jobs/{job_id}/artifacts.tar", target)

    def watch(self, job_id: str, poll_seconds: float = 1.0, out=sys.stdout) -> Job:
        """Poll until the job ends, drawing a progress bar on `out` (None: draw nothing); returns the final job."""
        last_line = None
        while True:
            job = self.job(job_id)
            if out is not None and (line := progress_line(job)) != last_line:
                draw_progress(job, out)
                last_line = line
            if job.ended:
                if out is not None and out.isatty():
                    out.write("\n")
                return job
            time.sleep(poll_seconds)

    # --- files --------------------------------------------------------------------------------------------

    def upload(self, path: Path, dataset_format: str | None = None) -> File:
        with open(path, "rb") as handle:
            data = {"format": dataset_format} if dataset_format else None
            # One boundary for the call: a retry sends the very bytes of the first try, as its Idempotency-Key says.
            boundary = uuid.uuid4().hex
            body = self._json(
                "POST",
                "/v1/files",
                files={"file": (path.name, handle)},
                data=data,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                rewind=lambda: handle.seek(0),
            )
        return File.model_validate(body)

    def files(self, *, limit: int = 50, after: str | None = None) -> FilePage:
        return FilePage.model_validate(
            self._json("GET", "/v1/files", params=_present({"limit": limit, "after": after}))
        )

    def file(self, file_id: str) -> File:
        return File.model_validate(self._json("GET", f"/v1/files/{file_id}"))

    def delete_file(self, file_id: str) -> None:
        self._checked(self._request("DELETE", f"/v1/files/{file_id}"))

    # --- health -------------------------------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    # --- plumbing -----------------------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._checked(self._request(method, path, **kwargs))
        return response.json()

    def _request(
        self, method: str, path: str, *, rewind: Callable[[], Any] | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **({"Idempotency-Key": str(uuid.uuid4())} if method == "POST" else {})}
        for delay in (*RETRY_DELAYS_SECONDS, None):
            try:
                return self.http.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                if delay is None:
                    raise ServerUnreachable(self.base_url, _reason(exc)) from None
                time.sleep(delay)
                if rewind is not None:
                    rewind()
        raise AssertionError("unreachable")

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.is_error:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            raise ApiError(response.status_code, problem if isinstance(problem, dict) else {"detail": str(problem)})
        return response

    def _download(self, path: str, target: Path) -> Path:
        """Streamed to a partial file beside `target`, renamed once complete: never a truncated `target`."""
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        try:
            with self.http.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    self._checked(response)
                with open(partial, "wb") as out:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        out.write(chunk)
            partial.replace(target)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.base_url, _reason(exc)) from None
        finally:
            partial.unlink(missing_ok=True)
        return target


def _present(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


def _reason(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def draw_progress(job: Job, out=sys.stdout) -> None:
    line = progress_line(job)
    if out.isatty():
        out.write("\r" + line.ljust(110))
    else:
        out.write(line + "\n")
    out.flush()


def progress_line(job: Job, width: int = 30) -> str:
    progress = job.progress or {}
    step, total = progress.get("step", 0), progress.get("total_steps") or 0
    filled = int(width * step / total) if total else 0
    bar = "#" * filled + "." * (width - filled)
    parts = [f"{job.id} {job.status:<10} [{bar}] {step}/{total or '?'}"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("tokens_per_second"):
        parts.append(f"{progress['tokens_per_second']:.0f} tok/s")
    if progress.get("eta_seconds") is not None and job.status == "running":
        parts.append(f"ETA {progress['eta_seconds']:.0f}s")
    return "  ".join(parts)
