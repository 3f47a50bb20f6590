"""Liveness and readiness."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import DatabaseDep, SettingsDep
from service.db import Database
from service.migrate import pending_migrations
from service.schemas import Readiness
from service.settings import Settings
from service.storage import job_storage

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={200: {"description": "ready"}, 503: {"model": Readiness, "description": "not ready; checks says why"}},
)
async def readyz(database: DatabaseDep, settings: SettingsDep) -> JSONResponse:
    checks = await anyio.to_thread.run_sync(_readiness, database, settings)
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


def _readiness(database: Database, settings: Settings) -> dict[str, str]:
    return {
        "database": _check(lambda: _database_current(database, settings)),
        "broker": _check(lambda: _ping_broker(settings.redis_url)),
        "storage": _check(lambda: job_storage(settings).check()),
    }


def _check(probe) -> str:
    try:
        probe()
    except Exception as exc:  # readiness reports the failure instead of raising it
        return f"error: {type(exc).__name__}: {exc}"
    return "ok"


def _database_current(database: Database, settings: Settings) -> None:
    with database.engine.connect() as connection:
        pending = pending_migrations(connection, settings)
    if pending:
        raise RuntimeError("the schema is behind the code: run `ftjobs db upgrade`")


def _ping_broker(redis_url: str | None) -> None:
    if redis_url is None:
        return  # the embedded broker is the SQLite file the database check already covers
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()
