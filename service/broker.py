"""The broker contract between the API (the sender) and the workers (the consumers): the task's name, the Celery
settings both sides use, and the shape of a message, which carries a job id and nothing else (the job's row is the
truth). service/queue.py sends and inspects; worker/celery_app.py consumes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from service.settings import Settings

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


def job_id_of(raw: bytes) -> str | None:
    """The job id a Celery (protocol 2) message carries: its body is base64 JSON [args, kwargs, embed]."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != RUN_JOB_TASK:
            return None
        args = json.loads(base64.b64decode(message["body"]))[0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None  # not one of ours: another producer's message in the same list
    return args[0] if args and isinstance(args[0], str) else None
