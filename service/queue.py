"""Sending and inspecting the training queue (the contract is service/broker.py). It sends job ids by task name,
never importing the worker."""

from __future__ import annotations

from celery import Celery

from service.broker import RUN_JOB_TASK, celery_config, job_id_of
from service.settings import Settings, get_settings

_senders: dict[tuple[str, str], Celery] = {}


def _sender(settings: Settings) -> Celery:
    """One producer app per broker and queue, kept: its connection pool is reused across sends."""
    key = (settings.broker_url, settings.queue_name)
    if key not in _senders:
        app = Celery("ftjobs-api")
        app.conf.update(celery_config(settings))
        _senders[key] = app
    return _senders[key]


def enqueue_job(job_id: str, settings: Settings | None = None) -> None:
    """Call only after the job's row is committed, so a fast worker always finds it."""
    _sender(settings or get_settings()).send_task(RUN_JOB_TASK, args=[job_id])


def pending_job_ids(settings: Settings) -> set[str] | None:
    """Job ids with a message waiting in the training queue, or None where the broker cannot be looked into
    (the embedded SQLite broker: the reconciler then re-sends on the grace period alone)."""
    if not settings.redis_url:
        return None
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    try:
        messages = client.lrange(settings.queue_name, 0, -1)
    finally:
        client.close()
    return {job_id for raw in messages if (job_id := job_id_of(raw))}


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting in the training queue (Redis only; None for the embedded broker)."""
    if not settings.redis_url:
        return None
    import redis

    client = redis.Redis.from_url(settings.redis_url)
    try:
        return int(client.llen(settings.queue_name))
    finally:
        client.close()
