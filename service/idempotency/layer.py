"""`Idempotency-Key` on every POST, as Stripe does it, for every route there is or will be: an ASGI layer.

A POST with the header and a bearer key is fingerprinted (method, path, query and body, a multipart boundary
made neutral, since a client builds a fresh one on every retry) and claims its key within the caller's tenant,
in a unit of work of its own, before the route runs:
- a key seen before with another fingerprint: 422 idempotency_key_reused;
- a key whose first request is still running: 409 idempotency_key_in_use (Retry-After), never a second run;
- a key answered before: that answer again (status, content type, body), with `Idempotent-Replayed: true`;
- a new key (or one past idempotency_key_hours, or held by a request that died): the route runs.

Where the answer is recorded, and what a crash costs:
- A route whose write unit is its answer says so (`CallerDatabase.write(..., answers=201)`, POST /v1/jobs): the
  answer is recorded in that unit's transaction, with the job. A crash leaves either both or neither, and a
  retry after a crash before the commit runs the submission again, once the claim is stale.
- Every other POST: the answer is recorded after the route has sent it, in a second unit. A crash between the
  route's commit and that unit leaves a claim with no answer; once it is stale, a retry runs the route again.
  That is a window of one short transaction, against a route class every router would have to remember.
Answers of 5xx, 401 and 429 are not recorded (the claim is released): they say nothing about the request, and
a retry should run it.

The body is spooled (in memory up to SPOOL_MEMORY_BYTES, then a temporary file) because it is hashed before the
route reads it: an upload costs one more local copy when it carries a key. Bodies past their route's limit are
refused here, as they would be while streaming into the route.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.orm import Session
from starlette.responses import Response

from domain.errors import DomainError
from service.db import Database
from service.errors import (
    BodyTooLarge,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    Unauthenticated,
    UploadTooLarge,
)
from service.idempotency import repository
from service.jobs.attempts import database_now
from service.models import IdempotencyKey
from service.settings import Settings
from service.tenancy.keys import authenticate, presented_key_sha256
from service.tenancy.ratelimit import RateLimiter

log = logging.getLogger(__name__)
HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
SPOOL_MEMORY_BYTES = 1024 * 1024
CHUNK_BYTES = 64 * 1024
MAX_RECORDED_BODY_BYTES = 1024 * 1024  # a POST answers with one object; anything larger is not kept
UNRECORDED_STATUSES = frozenset({401, 429})


@dataclass
class Claim:
    """This request holds `key` in its tenant. `recorded`: its answer went into the route's own transaction."""

    tenant_id: str
    key: str
    token: str
    recorded: bool = field(default=False)

    def record(self, session: Session, status_code: int, answer) -> None:
        """Record `answer` (a pydantic model, the route's response body) in the caller's transaction; refused,
        and the transaction with it, if a retry took the key over while this request stalled."""
        body = answer.model_dump_json(by_alias=True).encode()  # as FastAPI serializes a response_model
        if not repository.complete(
            session, self.tenant_id, self.key, self.token, status_code, "application/json", body
        ):
            raise IdempotencyKeyInUse("this request outlived its hold on the Idempotency-Key; a retry holds it")
        self.recorded = True


def claim_of(scope) -> Claim | None:
    return scope.get("state", {}).get("idempotency")


class IdempotencyLayer:
    def __init__(
        self,
        app,
        settings: Settings,
        *,
        upload_limit_bytes: int,
        json_limit_bytes: int,
        render_error: Callable[[DomainError, str, dict | None], Response],
    ) -> None:
        # render_error: the app's own (service/app.py error_response), so a refusal here has the body any error
        # on that route has: problem+json, or OpenAI's envelope on the OpenAI routes.
        self.app, self.settings, self.render_error = app, settings, render_error
        self.upload_limit, self.json_limit = upload_limit_bytes, json_limit_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        key, authorization = headers.get(HEADER), headers.get(b"authorization")
        if key is None or authorization is None:  # no key: nothing to do; no credentials: the route answers 401
            return await self.app(scope, receive, send)
        try:
            key_text = _valid_key(key)
            key_sha256 = presented_key_sha256(authorization.decode("latin-1"))
        except InvalidIdempotencyKey as error:
            return await self._problem(error, scope, receive, send)
        except Unauthenticated:
            return await self.app(scope, receive, send)
        with tempfile.SpooledTemporaryFile(SPOOL_MEMORY_BYTES) as body:
            try:
                digest = await self._spool(scope, receive, body, headers.get(b"content-type", b""))
            except DomainError as error:
                return await self._problem(error, scope, receive, send)
            if digest is None:
                return  # the client hung up before its body was sent
            await self._claimed(scope, receive, send, body, key_sha256, key_text, digest)

    async def _claimed(self, scope, receive, send, body, key_sha256: str, key: str, fingerprint: str) -> None:
        database: Database = scope["app"].state.database
        token = secrets.token_hex(16)
        try:
            tenant_id, held = await database.write(
                self._claim, scope["app"].state.rate_limiter, key_sha256, key, fingerprint, token
            )
        except Unauthenticated:  # an unknown or revoked key: the route says so, as it would without the header
            return await self.app(scope, _replay_body(body, receive), send)
        except DomainError as error:
            return await self._problem(error, scope, receive, send)
        if held is not None:
            return await self._answer_again(held, fingerprint, scope, receive, send)
        claim = Claim(tenant_id, key, token)
        scope.setdefault("state", {})["idempotency"] = claim
        answer = _Recorder(send)
        try:
            await self.app(scope, _replay_body(body, receive), answer.send)
        except BaseException:
            try:  # so that a retry runs the request again at once, not after the claim goes stale
                await database.write(repository.release, tenant_id, key, token)
            except Exception:
                log.exception("could not release Idempotency-Key %r; it frees itself once stale", key)
            raise
        if claim.recorded and answer.status is not None and answer.status < 500:
            return
        if answer.recordable:
            await database.write(
                repository.complete, tenant_id, key, token, answer.status, answer.content_type, bytes(answer.body)
            )
        else:
            await database.write(repository.release, tenant_id, key, token)

    def _claim(
        self, session: Session, rate_limiter: RateLimiter, key_sha256: str, key: str, fingerprint: str, token: str
    ) -> tuple[str, IdempotencyKey | None]:
        # The request is counted against its key's rate limit here, replays included, and only here: the route's
        # own unit skips the count when it finds the claim (service/api/deps.py).
        rate_limiter.hit(key_sha256)
        caller = authenticate(session.connection(), key_sha256)
        now = database_now(session)
        held = repository.claim(
            session,
            caller.tenant_id,
            key,
            fingerprint,
            token,
            now,
            expired_before=now - timedelta(hours=self.settings.idempotency_key_hours),
            stale_before=now - timedelta(seconds=self.settings.idempotency_lock_seconds),
        )
        if held is not None:
            session.expunge(held)
        return caller.tenant_id, held

    async def _spool(self, scope, receive, spool, content_type: bytes) -> str | None:
        """Read the body into `spool`; its fingerprint, or None if the client disconnected."""
        limit = self.upload_limit if scope["path"].startswith("/v1/files") else self.json_limit
        hasher = hashlib.sha256(
            b"\0".join([b"POST", scope["path"].encode("utf-8", "surrogateescape"), scope.get("query_string", b""), b""])
        )
        neutral = _BoundaryNeutral(content_type, hasher)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                too_large = UploadTooLarge if scope["path"].startswith("/v1/files") else BodyTooLarge
                raise too_large(f"the body is limited to {limit} bytes", limit_bytes=limit)
            spool.write(chunk)
            neutral.update(chunk)
            if not message.get("more_body", False):
                return neutral.hexdigest()

    async def _answer_again(self, held: IdempotencyKey, fingerprint: str, scope, receive, send) -> None:
        if held.fingerprint != fingerprint:
            return await self._problem(
                IdempotencyKeyReused(
                    "this Idempotency-Key was first sent with another request (method, path or body); use a new key"
                ),
                scope,
                receive,
                send,
            )
        if held.status_code is None:
            return await self._problem(
                IdempotencyKeyInUse(
                    "the first request with this Idempotency-Key is still running; retry to get its answer"
                ),
                scope,
                receive,
                send,
            )
        headers = [(b"content-length", str(len(held.response_body)).encode()), (b"idempotent-replayed", b"true")]
        if held.content_type:
            headers.append((b"content-type", held.content_type.encode("latin-1")))
        await send({"type": "http.response.start", "status": held.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": held.response_body})

    async def _problem(self, error: DomainError, scope, receive, send) -> None:
        await self.render_error(error, scope["path"], getattr(error, "headers", None))(scope, receive, send)


def _valid_key(raw: bytes) -> str:
    """Printable ASCII, 1 to 255 characters (a UUID is what clients send)."""
    if not 0 < len(raw) <= MAX_KEY_LENGTH or not all(0x20 < byte < 0x7F for byte in raw):
        raise InvalidIdempotencyKey(f"an Idempotency-Key is 1 to {MAX_KEY_LENGTH} printable ASCII characters")
    return raw.decode("ascii")


class _BoundaryNeutral:
    """Feeds a hasher the body with its multipart boundary replaced by a constant, across chunk edges."""

    TOKEN = b"--ftjobs-boundary"

    def __init__(self, content_type: bytes, hasher) -> None:
        self.hasher, self.carry = hasher, b""
        _, _, boundary = content_type.partition(b"boundary=")
        boundary = boundary.split(b";", 1)[0].strip().strip(b'"')
        self.pattern = b"--" + boundary if content_type.startswith(b"multipart/") and boundary else None

    def update(self, chunk: bytes) -> None:
        if self.pattern is None:
            return self.hasher.update(chunk)
        data = (self.carry + chunk).replace(self.pattern, self.TOKEN)
        keep = len(self.pattern) - 1  # a pattern cut by the chunk's edge is completed by the next chunk
        self.carry = data[-keep:] if len(data) > keep else data
        self.hasher.update(data[:-keep] if len(data) > keep else b"")

    def hexdigest(self) -> str:
        self.hasher.update(self.carry)
        return self.hasher.hexdigest()


def _replay_body(spool, receive):
    """The spooled body, then the client's own messages (its disconnect, which a streaming response waits for)."""
    spool.seek(0)
    done = False

    async def replayed():
        nonlocal done
        if done:
            return await receive()
        chunk = spool.read(CHUNK_BYTES)
        done = len(chunk) < CHUNK_BYTES
        return {"type": "http.request", "body": chunk, "more_body": not done}

    return replayed


class _Recorder:
    """Passes the response on, keeping its status, content type and (bounded) body."""

    def __init__(self, send) -> None:
        self._send, self.status, self.content_type, self.body = send, None, None, bytearray()
        self.overflowed = False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.content_type = dict(message.get("headers", [])).get(b"content-type", b"").decode("latin-1") or None
        elif message["type"] == "http.response.body" and not self.overflowed:
            self.body += message.get("body", b"")
            self.overflowed = len(self.body) > MAX_RECORDED_BODY_BYTES
        await self._send(message)

    @property
    def recordable(self) -> bool:
        return (
            self.status is not None
            and self.status < 500
            and self.status not in UNRECORDED_STATUSES
            and not self.overflowed
        )


_HEADER_DOC = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Send the same key again (for 24 h) to get this request's first answer instead of a "
    "second run; another request with the same key is a 422 idempotency_key_reused",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": "^[!-~]+$"},
}


def declare_in_openapi(schema: dict, problem_ref: dict) -> None:
    """The header on every POST of the document, with the 409 it may answer: the layer serves them all. The 409
    has the body the route's other errors have (its 422's: problem+json, or OpenAI's envelope on its routes),
    since the layer renders its refusals with the app's own error renderer."""
    for operations in schema.get("paths", {}).values():
        post = operations.get("post")
        if post is None:
            continue
        post.setdefault("parameters", []).append(_HEADER_DOC)
        content = post["responses"].get("422", {}).get("content") or {
            "application/problem+json": {"schema": problem_ref}
        }
        post["responses"].setdefault(
            "409",
            {
                "description": "idempotency_key_in_use: the first request with this Idempotency-Key is still running",
                "content": content,
            },
        )
