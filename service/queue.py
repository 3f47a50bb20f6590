"""The only API-side module that touches Celery. It sends job ids by task name, never importing the worker."""

from __future__ import annotations

import base64
import json
from typing import Any

from celery import Celery

from service.settings import Settings, get_settings

RUN_JOB_TASK = "ftjobs.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Broker settings shared by the API (sender) and the worker (consumer)."""
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        # Only Redis has a visibility timeout; the SQLAlchemy transport would pass it on to create_engine().
        "broker_transport_options": (
            {"visibility_timeout": settings.visibility_timeout_seconds} if settings.redis_url else {}
        ),
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,  # the jobs table holds every outcome
        "task_default_queue": settings.queue_name,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.queue_name}},
    }


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
    return {job_id for raw in messages if (job_id := _job_id_of(raw))}


def _job_id_of(raw: bytes) -> str | None:
    """The job id a Celery (protocol 2) message carries: its body is base64 JSON [args, kwargs, embed]."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != RUN_JOB_TASK:
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not one of ours: another producer's message in the same list
    return args[0] if args and isinstance(args[0], str) else None


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
