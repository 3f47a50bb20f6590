"""create_app(): routers with their body limits, problem+json errors, CORS when configured, /metrics."""

from __future__ import annotations

import gc
import json
import logging
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from domain.errors import DomainError
from service import console, metrics
from service.api import checkpoints, docs, files, health, jobs, openai, planner_accuracy, plans, sweeps, webhooks
from service.api.problems import AUTHENTICATED, PROBLEM_JSON, Problem, problems
from service.api.streams import StreamCount
from service.db import Database
from service.errors import (
    BodyTooLarge,
    InvalidSpec,
    MalformedRequest,
    MethodNotAllowed,
    ProblemError,
    RouteNotFound,
    UnsupportedMediaType,
    UploadTooLarge,
    http_status,
    to_problem,
)
from service.idempotency.layer import IdempotencyLayer, declare_in_openapi
from service.logs import configure_logging
from service.openai_compat import openai_error
from service.settings import Settings, get_settings
from service.tenancy.ratelimit import RateLimiter

log = logging.getLogger(__name__)
# The multipart envelope around an upload's bytes: boundaries, part headers, the format field.
MULTIPART_ENVELOPE_BYTES = 64 * 1024
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # no route reads a body on these: nothing to guard


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON

    def render(self, content: Any) -> bytes:
        # ASCII escapes: a detail may quote client input, and a lone surrogate in it has no UTF-8 form.
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class OpenAIErrorResponse(ProblemResponse):
    media_type = "application/json"


def problem_response(error: DomainError, request: Request, headers: dict[str, str] | None = None) -> Response:
    """problem+json; OpenAI's error envelope on the OpenAI routes; both in one body on /v1/files, which native
    clients and the OpenAI SDK share (the envelope as the problem's `error` member)."""
    return error_response(error, request.url.path, {**(getattr(error, "headers", None) or {}), **(headers or {})})


def error_response(error: DomainError, path: str, headers: dict[str, str] | None = None) -> Response:
    if path.startswith(openai.PREFIX):
        return OpenAIErrorResponse(openai_error(error).model_dump(), status_code=http_status(error), headers=headers)
    body = to_problem(error, instance=path)
    if path.startswith(files.router.prefix):
        body["error"] = openai_error(error).error.model_dump()
    return ProblemResponse(body, status_code=http_status(error), headers=headers)


async def _on_problem(request: Request, error: DomainError) -> Response:
    if http_status(error) >= 500:
        log.error("request failed: %s", error.detail)
    return problem_response(error, request)


async def _on_validation(request: Request, error: RequestValidationError) -> Response:
    errors = [{"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in error.errors()]
    summary = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
    return problem_response(InvalidSpec(summary, errors=errors), request)


# Starlette's own HTTP errors (no route, wrong method, a body past its limit) as our problems, each with its code.
_HTTP_PROBLEMS = {400: MalformedRequest, 404: RouteNotFound, 405: MethodNotAllowed, 415: UnsupportedMediaType}


async def _on_http(request: Request, error: StarletteHTTPException) -> Response:
    if error.status_code == 413:
        too_large = UploadTooLarge if request.url.path.startswith("/v1/files") else BodyTooLarge
        problem: ProblemError = too_large("the request body exceeds this route's size limit")
    elif error.status_code in _HTTP_PROBLEMS:
        problem = _HTTP_PROBLEMS[error.status_code](str(error.detail))
    else:
        problem = ProblemError(str(error.detail))
        problem.status, problem.code, problem.title = error.status_code, f"http_{error.status_code}", str(error.detail)
    headers = dict(error.headers or {})
    if error.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return problem_response(problem, request, headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's Allow names only the first matching route's,
    and GET and POST /v1/jobs are two routes."""
    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE and getattr(route, "methods", None):
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


async def _on_unexpected(request: Request, error: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return problem_response(ProblemError("an unexpected error occurred; see the server log"), request)


class DeclaredLengthGuard:
    """Refuses a body whose Content-Length is over its route's limit, before a byte of it is read.

    A body without a Content-Length (chunked) is cut off by the routers' own max_body_size as it streams.
    This guard exists because Starlette's limiter, seeing an oversized Content-Length, replaces whatever
    response follows with a plain-text 413; answered here, the 413 is problem+json like every other error.
    """

    def __init__(self, app, upload_limit_bytes: int, json_limit_bytes: int) -> None:
        self.app, self.upload_limit, self.json_limit = app, upload_limit_bytes, json_limit_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in BODYLESS_METHODS:
            uploading = scope["path"].startswith("/v1/files")
            limit = self.upload_limit if uploading else self.json_limit
            length = next((value for name, value in scope["headers"] if name == b"content-length"), b"")
            if length.isdigit() and int(length) > limit:
                error = (UploadTooLarge if uploading else BodyTooLarge)(
                    f"the body is limited to {limit} bytes", limit_bytes=limit
                )
                return await error_response(error, scope["path"])(scope, receive, send)
        return await self.app(scope, receive, send)


def _metrics() -> Response:
    return Response(generate_latest(metrics.registry_to_scrape()), media_type=CONTENT_TYPE_LATEST)


def _operation_id(route: APIRoute) -> str:
    """The route function's name (submit_job, get_job): FastAPI's default appends the path and the method."""
    return route.name


def _problem_validation_errors(operation: dict[str, Any]) -> None:
    """A 422 that FastAPI declared on its own (HTTPValidationError) is answered as problem+json (_on_validation)."""
    content = operation.get("responses", {}).get("422", {}).get("content", {})
    if "HTTPValidationError" in str(content):
        operation["responses"]["422"] = problems(422)[422]


def _binary_uploads(schema: dict[str, Any]) -> None:
    """Multipart file fields carry `format: binary` beside OpenAPI 3.1's contentMediaType: client generators
    (openapi-python-client) send a field without it as text."""
    components = schema["components"]["schemas"]
    for operations in schema["paths"].values():
        for operation in operations.values():
            form = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
            body = components.get(form.get("schema", {}).get("$ref", "").rsplit("/", 1)[-1], {})
            for field in body.get("properties", {}).values():
                for part in (field, field.get("items", {})):
                    if "contentMediaType" in part and part.get("type") == "string":
                        part.setdefault("format", "binary")


def _const_as_enum(node: Any) -> None:
    """`const: x` as the equivalent `enum: [x]` (a Literal of one value, e.g. micro_batch_size "auto"):
    openapi-python-client 0.29 parses a const member of an anyOf without trying the union's other members,
    so a client it generates fails on every job whose micro_batch_size is a number."""
    if isinstance(node, dict):
        if "const" in node and "enum" not in node:
            node["enum"] = [node.pop("const")]
        for value in node.values():
            _const_as_enum(value)
    elif isinstance(node, list):
        for value in node:
            _const_as_enum(value)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the Problem component every error response refers to."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
        for operations in schema["paths"].values():
            for operation in operations.values():
                _problem_validation_errors(operation)
        _binary_uploads(schema)
        _const_as_enum(components)
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        schema["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "An API key from `ftjobs keys create`"}
        }
        declare_in_openapi(schema, {"$ref": "#/components/schemas/Problem"})
        for path, operations in schema["paths"].items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def _include_routers(app: FastAPI, settings: Settings) -> int:
    """Every router with the problems it declares; returns the upload route's body limit."""
    # The limits are checked while the body streams in: a body past them is never read to its end.
    upload_limit = settings.max_upload_bytes + MULTIPART_ENVELOPE_BYTES
    app.include_router(jobs.router, responses=AUTHENTICATED, max_body_size=settings.max_json_body_bytes)
    app.include_router(plans.router, responses=AUTHENTICATED, max_body_size=settings.max_json_body_bytes)
    app.include_router(sweeps.router, responses=AUTHENTICATED, max_body_size=settings.max_json_body_bytes)
    app.include_router(checkpoints.router, responses=AUTHENTICATED)
    app.include_router(files.router, responses=AUTHENTICATED, max_body_size=upload_limit)
    app.include_router(webhooks.router, responses=AUTHENTICATED)
    app.include_router(planner_accuracy.router, responses=AUTHENTICATED)
    app.include_router(openai.router, responses=openai.ERRORS, max_body_size=settings.max_json_body_bytes)
    app.include_router(health.router, responses=problems(500))
    return upload_limit


def _install_error_handlers(app: FastAPI) -> None:
    """Every error as problem+json (OpenAI's envelope on the OpenAI routes)."""
    app.add_exception_handler(DomainError, _on_problem)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings)
        settings.ensure_dirs()
        # Made here, inside the event loop that serves the requests, which the database's admission belongs to.
        app.state.database, app.state.rate_limiter = Database(settings), RateLimiter(settings)
        metrics.STATE_COLLECTOR.engine = app.state.database.engine
        # What start-up made (modules, the app, its routes) lives as long as the process: frozen, the collector
        # no longer walks it on every full collection, which would otherwise show as request latency tails.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            app.state.rate_limiter.close()
            app.state.database.dispose()

    app = FastAPI(
        title="ftjobs",
        version="1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=_operation_id,
        description="Fine-tuning jobs with a GPU-memory planner that refuses what cannot fit.",
    )
    upload_limit = _include_routers(app, settings)
    docs.install(app)  # /docs and /redoc from local assets
    app.include_router(console.router)  # /ui: the web console
    _install_error_handlers(app)
    # Inside CORS, whose headers its own answers (replays, 409, 422) need, and inside the length guard, which
    # refuses an oversized declared body before this layer spools a byte of it.
    app.add_middleware(
        IdempotencyLayer,
        settings=settings,
        upload_limit_bytes=upload_limit,
        json_limit_bytes=settings.max_json_body_bytes,
        render_error=error_response,
    )
    if settings.cors_origin_list:  # off unless configured: no browser origin may call the API by default
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
            expose_headers=["Idempotent-Replayed"],
        )
    app.add_middleware(
        DeclaredLengthGuard, upload_limit_bytes=upload_limit, json_limit_bytes=settings.max_json_body_bytes
    )
    metrics.install(app, settings)  # outermost, so refused requests are measured too
    app.state.settings = settings
    app.state.event_streams = StreamCount()  # GET /v1/jobs/{id}/events as SSE (service/api/streams.py)
    app.add_api_route("/metrics", _metrics, include_in_schema=False)
    app.openapi = lambda: _openapi(app)
    return app
