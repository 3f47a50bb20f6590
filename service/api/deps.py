"""Request dependencies: the settings, the database, and the caller's database work.

Every dependency here is async and does no blocking I/O, so none costs a trip to the threadpool. A request's
database work, authentication included, is one function run in one thread (service/db.py `Database`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from service.db import Database
from service.idempotency.layer import Claim, claim_of
from service.settings import Settings
from service.tenancy.keys import Caller, authenticate, presented_key_sha256
from service.tenancy.ratelimit import RateLimiter


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_database(request: Request) -> Database:
    return request.app.state.database


SettingsDep = Annotated[Settings, Depends(get_settings)]
DatabaseDep = Annotated[Database, Depends(get_database)]


class CallerDatabase:
    """The database as the caller sees it. The request's first unit of work counts it against the presented
    key's rate limit and authenticates the key, in the same thread and on the same connection as the work, so
    a revoked key is refused from its very next request; then it runs `work(session, *args, caller=caller)`,
    and `then` on its result: the response is built in the unit, while what it reads is still attached to
    its session. Later units of the same request reuse the caller.

    `write(..., answers=status)` says that `then`'s result is the route's answer: when the request holds an
    Idempotency-Key (service/idempotency/layer.py), the answer is recorded in the same transaction."""

    def __init__(
        self, database: Database, rate_limiter: RateLimiter, key_sha256: str, claim: Claim | None = None
    ) -> None:
        self.database, self.rate_limiter, self.key_sha256, self.claim = database, rate_limiter, key_sha256, claim
        self._caller: Caller | None = None

    async def read(self, work: Callable[..., Any], *args: Any, then: Callable[[Any], Any] | None = None) -> Any:
        return await self.database.read(self._as_caller, work, args, then)

    async def read_rows(self, work: Callable[..., Any], *args: Any, then: Callable[[Any], Any] | None = None) -> Any:
        """As `read`, `work` getting a Core connection (service/db.py `Database.read_rows`)."""
        return await self.database.read_rows(self._as_caller, work, args, then)

    async def write(
        self, work: Callable[..., Any], *args: Any, then: Callable[[Any], Any] | None = None, answers: int | None = None
    ) -> Any:
        if answers is not None and self.claim is not None:
            return await self.database.write(self._answering, work, args, then, answers)
        return await self.database.write(self._as_caller, work, args, then)

    async def authenticate(self) -> Caller:
        """Count and authenticate alone, as a unit of its own."""
        return await self.database.read_rows(self._caller_of)

    def _as_caller(
        self, unit: Session | Connection, work: Callable[..., Any], args: tuple, then: Callable[[Any], Any] | None
    ) -> Any:
        caller = self._caller or self._caller_of(unit.connection() if isinstance(unit, Session) else unit)
        result = work(unit, *args, caller=caller)
        return then(result) if then else result

    def _answering(
        self,
        session: Session,
        work: Callable[..., Any],
        args: tuple,
        then: Callable[[Any], Any] | None,
        status_code: int,
    ) -> Any:
        answer = self._as_caller(session, work, args, then)
        self.claim.record(session, status_code, answer)
        return answer

    def _caller_of(self, connection: Connection) -> Caller:
        if self.claim is None:  # with an Idempotency-Key the layer counted the request when it claimed the key
            self.rate_limiter.hit(self.key_sha256)
        self._caller = authenticate(connection, self.key_sha256)
        return self._caller


async def get_caller_database(request: Request) -> CallerDatabase:
    """The header read directly, not through fastapi.security.HTTPBearer: a dependency and a credentials object
    less on every poll. The scheme is declared in the OpenAPI document by service/app.py instead."""
    key_sha256 = presented_key_sha256(request.headers.get("authorization"))
    return CallerDatabase(
        request.app.state.database, request.app.state.rate_limiter, key_sha256, claim_of(request.scope)
    )


async def get_authenticated_database(db: Annotated[CallerDatabase, Depends(get_caller_database)]) -> CallerDatabase:
    await db.authenticate()
    return db


# Reads (GET): authentication runs inside the request's one unit of work, a single thread hop.
CallerDbDep = Annotated[CallerDatabase, Depends(get_caller_database)]
# Requests with a body: the key is checked before the body is validated, so an unknown key gets 401 whatever it
# sends, and a long request (an upload) does no work for it. One more hop, on routes that are not polled.
AuthenticatedDbDep = Annotated[CallerDatabase, Depends(get_authenticated_database)]
