"""API keys: created at random, shown once, stored as a hash, each belonging to one tenant.

A key is 32 random bytes, so a plain SHA-256 suffices to store it: a slow password hash defends low-entropy
secrets against guessing, and 256 random bits cannot be guessed. It also lets a request find its key with one
indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from service.errors import ProblemError, Unauthenticated
from service.models import ApiKey, Tenant
from service.tenancy import repository
from service.webhooks.delivery import new_secret
from service.webhooks.repository import set_tenant_webhook

KEY_PREFIX = "ftj_"
KEY_RANDOM_BYTES = 32


class KeyNotFound(ProblemError):
    status, code, title = 404, "key_not_found", "No such active API key"


class InvalidWebhookUrl(ProblemError):
    status, code, title = 422, "invalid_webhook_url", "A webhook URL is an http or https URL with a host"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the key, its tenant, and whether it may act across tenants."""

    key_id: str
    tenant_id: str
    admin: bool

    @property
    def tenant_scope(self) -> str | None:
        """The tenant whose rows this caller may see; None for an admin, who sees every tenant's."""
        return None if self.admin else self.tenant_id


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def ensure_tenant(session: Session, name: str, max_active_jobs: int | None = None) -> Tenant:
    tenant = repository.get_tenant_by_name(session, name)
    if tenant is None:
        return repository.add_tenant(session, Tenant(id=new_id("ten"), name=name, max_active_jobs=max_active_jobs))
    if max_active_jobs is not None:
        repository.set_max_active_jobs(session, tenant.id, max_active_jobs)
    return tenant


def create_key(
    session: Session,
    tenant_name: str,
    *,
    admin: bool = False,
    max_active_jobs: int | None = None,
    webhook_url: str | None = None,
) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if new); returns the row and the key, which is never stored.
    `webhook_url` becomes the tenant's webhook (service/webhooks), signed with its secret (made if it has none)."""
    tenant = ensure_tenant(session, tenant_name, max_active_jobs)
    if webhook_url is not None:
        set_webhook(session, tenant, webhook_url)
    secret = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    key = ApiKey(id=new_id("key"), tenant_id=tenant.id, key_sha256=hash_key(secret), admin=admin)
    return repository.add_key(session, key), secret


def set_webhook(session: Session, tenant: Tenant, url: str) -> str:
    """Where the tenant's job events go; returns its signing secret, kept if it had one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhookUrl(f"{url!r} is not an http(s) URL with a host")
    set_tenant_webhook(session, tenant, url, tenant.webhook_secret or new_secret())
    return tenant.webhook_secret


def revoke_key(session: Session, key_id: str) -> None:
    if not repository.revoke_key(session, key_id):
        raise KeyNotFound(f"no active key {key_id}")


def presented_key_sha256(authorization: str | None) -> str:
    """The hash of the key in an `Authorization: Bearer <key>` header, or Unauthenticated without one."""
    scheme, _, secret = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthenticated("send Authorization: Bearer <api key>")
    return hash_key(secret.strip())


def authenticate(connection: Connection, key_sha256: str) -> Caller:
    """The caller holding the key with this hash, or Unauthenticated if it is unknown or revoked."""
    key = repository.find_active_key(connection, key_sha256)
    if key is None:
        raise Unauthenticated("the API key is unknown or revoked")
    return Caller(key_id=key.id, tenant_id=key.tenant_id, admin=key.admin)
