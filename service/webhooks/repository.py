"""Every SQL statement about webhook deliveries and the tenant's webhook. Functions flush; callers commit."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, DateTime, Integer, Row, String, Text, bindparam, insert, literal, select, update
from sqlalchemy.orm import Session

from service.models import Job, JobEvent, Tenant, WebhookAttempt, WebhookDelivery

# The event kinds a webhook reports, and the type each is sent as. Progress is left to polls and streams: a
# receiver would get one POST per logged step.
EVENT_TYPES = {"state": "job.status_changed", "checkpoint": "job.checkpoint_saved"}
DELIVERIES, ATTEMPTS, JOBS, TENANTS = (
    WebhookDelivery.__table__,
    WebhookAttempt.__table__,
    Job.__table__,
    Tenant.__table__,
)
_COLUMNS = (
    "id",
    "job_id",
    "tenant_id",
    "event_seq",
    "event_type",
    "url",
    "payload",
    "status",
    "attempts",
    "next_attempt_at",
    "created_at",
)
# One statement per reported event, built once: the job's tenant's URL decides whether there is anything to send,
# so a tenant without a webhook costs an INSERT that inserts nothing.
_ADD_FOR_EVENT = insert(DELIVERIES).from_select(
    _COLUMNS,
    select(
        bindparam("id", type_=String),
        JOBS.c.id,
        JOBS.c.tenant_id,
        bindparam("event_seq", type_=Integer),
        bindparam("event_type", type_=String),
        TENANTS.c.webhook_url,
        bindparam("payload", type_=Text),
        literal("pending"),
        literal(0),
        bindparam("now", type_=DateTime(timezone=True)),
        bindparam("now", type_=DateTime(timezone=True)),
    )
    .select_from(JOBS.join(TENANTS, TENANTS.c.id == JOBS.c.tenant_id))
    .where(JOBS.c.id == bindparam("job_id"), TENANTS.c.webhook_url.is_not(None)),
)


def add_for_event(session: Session, event: JobEvent) -> None:
    """Queue the event for the job's tenant's webhook, if it has one, in the caller's transaction."""
    event_type = EVENT_TYPES[event.kind]
    body = {
        "type": event_type,
        "timestamp": event.created_at.isoformat().replace("+00:00", "Z"),
        "data": {"job_id": event.job_id, "seq": event.seq, **event.data},
    }
    session.execute(
        _ADD_FOR_EVENT,
        {
            "id": f"msg_{secrets.token_hex(12)}",
            "job_id": event.job_id,
            "event_seq": event.seq,
            "event_type": event_type,
            "now": event.created_at,
            "payload": json.dumps(body, separators=(",", ":"), default=str),
        },
    )


@dataclass(frozen=True)
class Due:
    """A delivery claimed for sending: what to POST where, signed with which secret."""

    id: str
    url: str
    payload: str
    attempts: int
    secret: str | None


def claim_due(session: Session, now: datetime, limit: int, hold_seconds: float) -> list[Due]:
    """Pending deliveries whose time has come, oldest first; each is held for `hold_seconds` (its next attempt
    moved past the send), so no other sender takes it meanwhile and a sender that dies lets it go again. Rows
    another sender is claiming right now are skipped."""
    rows = session.execute(
        select(DELIVERIES.c.id, DELIVERIES.c.url, DELIVERIES.c.payload, DELIVERIES.c.attempts, TENANTS.c.webhook_secret)
        .select_from(DELIVERIES.join(TENANTS, TENANTS.c.id == DELIVERIES.c.tenant_id))
        .where(DELIVERIES.c.status == "pending", DELIVERIES.c.next_attempt_at <= now)
        .order_by(DELIVERIES.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True, of=DELIVERIES)
    ).all()
    if rows:
        session.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id.in_([row.id for row in rows]))
            .values(next_attempt_at=now + timedelta(seconds=hold_seconds))
        )
    return [Due(*row) for row in rows]


def record_attempt(
    session: Session,
    due: Due,
    now: datetime,
    status_code: int | None,
    error: str | None,
    duration_seconds: float,
    next_attempt_at: datetime | None,
) -> bool:
    """Log one POST of `due` and move the delivery on: delivered (no error), failed for good (no next attempt),
    or pending until `next_attempt_at`. False if another sender logged this attempt first."""
    number = due.attempts + 1
    if error is None:
        values = {"status": "delivered", "delivered_at": now}
    elif next_attempt_at is None:
        values = {"status": "failed"}
    else:
        values = {"next_attempt_at": next_attempt_at}
    moved = session.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.id == due.id, DELIVERIES.c.status == "pending", DELIVERIES.c.attempts == due.attempts)
        .values(attempts=number, **values)
    ).rowcount
    if moved:
        session.add(
            WebhookAttempt(
                delivery_id=due.id,
                number=number,
                attempted_at=now,
                status_code=status_code,
                error=error,
                duration_seconds=duration_seconds,
            )
        )
        session.flush()
    return moved == 1


_DELIVERY_LOG_COLUMNS = (
    DELIVERIES.c.id,
    DELIVERIES.c.event_seq,
    DELIVERIES.c.event_type,
    DELIVERIES.c.url,
    DELIVERIES.c.status,
    DELIVERIES.c.attempts,
    DELIVERIES.c.next_attempt_at,
    DELIVERIES.c.created_at,
    DELIVERIES.c.delivered_at,
)


def deliveries_of(connection: Connection, job_id: str, after_seq: int, limit: int) -> list[tuple[Row, list[Row]]]:
    """A page of the job's deliveries in event order, each with its attempts in order."""
    deliveries = connection.execute(
        select(*_DELIVERY_LOG_COLUMNS)
        .where(DELIVERIES.c.job_id == job_id, DELIVERIES.c.event_seq > after_seq)
        .order_by(DELIVERIES.c.event_seq)
        .limit(limit)
    ).all()
    attempts: dict[str, list[Row]] = {row.id: [] for row in deliveries}
    if deliveries:
        for attempt in connection.execute(
            select(ATTEMPTS)
            .where(ATTEMPTS.c.delivery_id.in_(list(attempts)))
            .order_by(ATTEMPTS.c.delivery_id, ATTEMPTS.c.number)
        ):
            attempts[attempt.delivery_id].append(attempt)
    return [(row, attempts[row.id]) for row in deliveries]


def set_tenant_webhook(session: Session, tenant: Tenant, url: str, secret: str) -> None:
    tenant.webhook_url, tenant.webhook_secret = url, secret
    session.flush()
