"""Every SQL statement about idempotency keys. Functions flush; callers commit."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.models import IdempotencyKey


def claim(
    session: Session,
    tenant_id: str,
    key: str,
    fingerprint: str,
    token: str,
    now: datetime,
    *,
    expired_before: datetime,
    stale_before: datetime,
) -> IdempotencyKey | None:
    """None once this request (`token`) holds the key: it was new, expired, or held by a request that stalled
    (unanswered since before `stale_before`). Otherwise the row as the other request left it.

    On PostgreSQL the insert of a key another transaction is inserting waits for that transaction's end, so two
    requests can never both believe they hold a key."""
    dialect_insert = postgresql_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    inserted = session.execute(
        dialect_insert(IdempotencyKey)
        .values(tenant_id=tenant_id, key=key, fingerprint=fingerprint, token=token, created_at=now)
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.token)
    ).scalar()
    if inserted is not None:
        return None
    taken_over = session.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            (IdempotencyKey.created_at < expired_before)
            | (IdempotencyKey.status_code.is_(None) & (IdempotencyKey.created_at < stale_before)),
        )
        .values(
            fingerprint=fingerprint,
            token=token,
            created_at=now,
            status_code=None,
            content_type=None,
            response_body=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if taken_over:
        return None
    return session.scalar(
        select(IdempotencyKey).where(IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.key == key)
    )


def complete(
    session: Session, tenant_id: str, key: str, token: str, status_code: int, content_type: str | None, body: bytes
) -> bool:
    """Record the first response; False if `token` no longer holds the key (another request took it over)."""
    return (
        session.execute(
            update(IdempotencyKey)
            .where(
                IdempotencyKey.tenant_id == tenant_id,
                IdempotencyKey.key == key,
                IdempotencyKey.token == token,
                IdempotencyKey.status_code.is_(None),
            )
            .values(status_code=status_code, content_type=content_type, response_body=body)
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


def release(session: Session, tenant_id: str, key: str, token: str) -> None:
    """Forget an unanswered claim, so that a retry runs the request again."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.token == token,
            IdempotencyKey.status_code.is_(None),
        )
    )


def delete_created_before(session: Session, before: datetime, limit: int) -> int:
    """Delete up to `limit` keys created before then; how many went."""
    doomed = select(IdempotencyKey.tenant_id, IdempotencyKey.key).where(IdempotencyKey.created_at < before).limit(limit)
    return session.execute(
        delete(IdempotencyKey)
        .where(tuple_(IdempotencyKey.tenant_id, IdempotencyKey.key).in_(doomed))
        .execution_options(synchronize_session=False)
    ).rowcount
