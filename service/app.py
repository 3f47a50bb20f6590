"""create_app(): routers, problem+json errors, the upload size guard, /metrics."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import metrics
from service.api import files, health, jobs, plans
from service.db import is_disconnect
from service.errors import DatabaseUnavailable, InvalidSpec, ProblemError, UploadTooLarge
from service.logs import configure_logging
from service.settings import Settings, get_settings

log = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"


def problem_response(error: ProblemError, request: Request) -> JSONResponse:
    # A 503 is a passing state (storage or database unreachable): say when a retry is worth it.
    headers = {"Retry-After": "5"} if error.status == 503 else None
    return JSONResponse(error.to_problem(instance=request.url.path), status_code=error.status,
                        media_type=PROBLEM_JSON, headers=headers)


async def _on_problem(request: Request, error: ProblemError) -> JSONResponse:
    if error.status >= 500:
        log.error("request failed: %s", error.detail)
    return problem_response(error, request)


async def _on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return problem_response(InvalidSpec(summary, errors=errors), request)


async def _on_http(request: Request, error: StarletteHTTPException) -> JSONResponse:
    problem = ProblemError(str(error.detail))
    problem.status, problem.code, problem.title = error.status_code, f"http_{error.status_code}", str(error.detail)
    return problem_response(problem, request)


async def _on_unexpected(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return problem_response(ProblemError("an unexpected error occurred; see the server log"), request)


def _metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


class UploadSizeGuard:
    """Refuses an oversized upload from its Content-Length, before a byte of the body is read.

    Uploads without a Content-Length are still cut off while streaming to disk (service/files.py).
    """

    def __init__(self, app, max_upload_bytes: int) -> None:
        self.app, self.limit = app, max_upload_bytes + 64 * 1024  # room for the multipart envelope

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/files"):
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and int(length) > self.limit:
                error = UploadTooLarge(f"uploads are limited to {self.limit - 64 * 1024} bytes")
                response = JSONResponse(error.to_problem(instance=scope["path"]), status_code=error.status,
                                        media_type=PROBLEM_JSON)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class DatabaseReconnect:
    """A request whose database connection was lost (a restarted server, pg_terminate_backend) runs again on a
    fresh connection when it only reads (GET, HEAD), and otherwise answers 503 with Retry-After: the
    transaction never committed, so the client's retry is safe. Never a 500 for what a retry fixes."""

    RETRIES = 2

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        reads = scope["method"] in ("GET", "HEAD")
        for attempt in range(self.RETRIES + 1):
            try:
                return await self.app(scope, receive, tracking_send)
            except DBAPIError as error:
                if started or not is_disconnect(error):
                    raise
                log.warning("database connection lost during %s %s (%s)", scope["method"], scope["path"],
                            type(error.orig).__name__)
                if not reads or attempt == self.RETRIES:
                    problem = DatabaseUnavailable("the database connection was lost; retry the request")
                    response = JSONResponse(problem.to_problem(instance=scope["path"]), status_code=problem.status,
                                            media_type=PROBLEM_JSON, headers={"Retry-After": "1"})
                    return await response(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        configure_logging(settings)
        settings.ensure_dirs()
        yield

    app = FastAPI(title="ftjobs", version="1.0", lifespan=lifespan,
                  description="Fine-tuning jobs with a GPU-memory planner that refuses what cannot fit.")
    for router in (jobs.router, plans.router, files.router, health.router):
        app.include_router(router)
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
    app.add_middleware(UploadSizeGuard, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(DatabaseReconnect)
    metrics.install(app, settings)  # outermost, so refused uploads are measured too
    app.dependency_overrides[get_settings] = lambda: settings
    app.add_api_route("/metrics", _metrics, include_in_schema=False)
    return app
