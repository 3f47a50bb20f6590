"""The GPUs that count: those registered by a worker that has heartbeated recently."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from service.jobs import repository
from service.jobs.attempts import database_now
from service.models import RegisteredGpu
from service.settings import Settings


def gpu_expiry(settings: Settings) -> timedelta:
    """A worker heartbeats its GPUs every reconcile interval: three missed beats, or a lease, mean it is gone."""
    return timedelta(seconds=max(3 * settings.reconcile_interval_seconds, settings.lease_seconds))


def live_gpus(session: Session, settings: Settings) -> list[RegisteredGpu]:
    """Largest first; a crashed worker's GPUs drop out here before any reconciler deletes them."""
    return repository.list_gpus(session, heartbeat_after=database_now(session) - gpu_expiry(settings))
