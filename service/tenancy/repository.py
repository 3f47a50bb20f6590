"""Every SQL statement about tenants and API keys. Functions flush; callers commit."""

from __future__ import annotations

from sqlalchemy import Connection, Row, bindparam, func, select, update
from sqlalchemy.orm import Session

from domain.states import TERMINAL, JobStatus
from service.models import ApiKey, Job, Tenant, utcnow


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def add_tenant(session: Session, tenant: Tenant) -> Tenant:
    session.add(tenant)
    session.flush()
    return tenant


def set_max_active_jobs(session: Session, tenant_id: str, max_active_jobs: int | None) -> None:
    session.execute(update(Tenant).where(Tenant.id == tenant_id).values(max_active_jobs=max_active_jobs))


def lock_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant row, locked until commit, so two submissions cannot both pass the active-jobs quota."""
    return session.scalars(select(Tenant).where(Tenant.id == tenant_id).with_for_update()).one()


def count_active_jobs(session: Session, tenant_id: str) -> int:
    # IN the active states, not NOT IN the terminal ones: three ranges of ix_jobs_tenant_id_status_seq instead
    # of every job the tenant ever ran.
    active = [status.value for status in JobStatus if status not in TERMINAL]
    return session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(active))
    )


def add_key(session: Session, key: ApiKey) -> ApiKey:
    session.add(key)
    session.flush()
    return key


KEYS = ApiKey.__table__
# Every request asks this once: built once, run as Core (columns, no entity), as the status polls are.
_ACTIVE_KEY = select(KEYS.c.id, KEYS.c.tenant_id, KEYS.c.admin).where(
    KEYS.c.key_sha256 == bindparam("key_sha256"), KEYS.c.revoked_at.is_(None)
)


def find_active_key(connection: Connection, key_sha256: str) -> Row[tuple[str, str, bool]] | None:
    """(id, tenant_id, admin) of the unrevoked key with this hash."""
    return connection.execute(_ACTIVE_KEY, {"key_sha256": key_sha256}).first()


def revoke_key(session: Session, key_id: str) -> bool:
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return result.rowcount == 1


def list_keys(session: Session) -> list[tuple[ApiKey, Tenant]]:
    query = select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id).order_by(ApiKey.created_at)
    return [(key, tenant) for key, tenant in session.execute(query)]
