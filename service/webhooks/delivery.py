"""Sending the outbox: claim due deliveries, POST each signed, log the attempt, retry with backoff.

Every worker runs `run_deliveries` in a thread of its own (worker/maintenance.py), as it runs the reconciler:
claims lock rows with FOR UPDATE SKIP LOCKED and every outcome is a guarded UPDATE, so any number of senders can
run at once; nothing else has to be deployed, and the API stays stateless. A thread apart from the reconciler and
from training, so a slow receiver (each POST is bounded by webhook_timeout_seconds) delays only other webhooks.
Delivery is at least once: a sender that dies after its POST and before its log lets the delivery go again once
its hold runs out; receivers deduplicate by `webhook-id`, the delivery's id, the same on every retry.

Signing follows the Standard Webhooks spec: `webhook-signature: v1,<base64 HMAC-SHA256>` of
"{webhook-id}.{webhook-timestamp}.{body}", keyed by the base64-decoded tenant secret (`whsec_...`).
Redirects are not followed: a 3xx is a failed attempt, logged with its Location, so a webhook never ends up
posting to a host nobody configured.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx

from service.db import in_transaction
from service.jobs.attempts import database_now
from service.settings import Settings
from service.webhooks import repository
from service.webhooks.repository import Due

log = logging.getLogger(__name__)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24  # 192 bits, as Standard Webhooks' reference libraries generate them
CLAIM_BATCH = 32


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def retry_delay_seconds(attempts: int, settings: Settings) -> float:
    """After the n-th failed attempt: base * 4^(n-1), at most webhook_retry_max_seconds (5 s, 20 s, 80 s, ...)."""
    return min(settings.webhook_retry_base_seconds * 4 ** (attempts - 1), settings.webhook_retry_max_seconds)


def post(client: httpx.Client, due: Due) -> tuple[int | None, str | None, float]:
    """POST one delivery: (HTTP status or None, error or None, seconds). The body of the answer is never read."""
    started = time.monotonic()
    if not due.secret:
        return None, "the tenant has no webhook signing secret", 0.0
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "ftjobs-webhooks",
        "webhook-id": due.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(due.secret, due.id, timestamp, due.payload),
    }
    try:
        with client.stream("POST", due.url, content=due.payload.encode(), headers=headers) as response:
            status = response.status_code
            location = response.headers.get("location")
    except httpx.HTTPError as error:
        return None, f"{type(error).__name__}: {error}"[:500], time.monotonic() - started
    if 200 <= status < 300:
        return status, None, time.monotonic() - started
    error = f"HTTP {status}" + (f", redirect to {location} not followed" if location else "")
    return status, error[:500], time.monotonic() - started


def deliver_due(settings: Settings, client: httpx.Client, pool: ThreadPoolExecutor) -> int:
    """One round: claim what is due, send it (webhook_concurrency at a time), log each; how many were sent."""
    # Held past the longest a POST can take: connect, write and read timeouts each, plus slack.
    hold_seconds = 3 * settings.webhook_timeout_seconds + 10
    due = in_transaction(
        lambda session: repository.claim_due(session, database_now(session), CLAIM_BATCH, hold_seconds), settings
    )
    list(pool.map(lambda delivery: _send_and_log(settings, client, delivery), due))
    return len(due)


def _send_and_log(settings: Settings, client: httpx.Client, due: Due) -> None:
    status, error, seconds = post(client, due)
    attempts = due.attempts + 1
    retry = error is not None and attempts < settings.webhook_max_attempts

    def log_attempt(session) -> bool:
        now = database_now(session)
        next_at = now + timedelta(seconds=retry_delay_seconds(attempts, settings)) if retry else None
        return repository.record_attempt(session, due, now, status, error, seconds, next_at)

    in_transaction(log_attempt, settings)
    if error is not None:
        log.info("webhook %s attempt %d failed (%s)%s", due.id, attempts, error, "" if retry else "; giving up")


def run_deliveries(stopped: threading.Event, settings: Settings) -> None:
    """Send due deliveries until `stopped` is set: at once again after a full batch, else every poll interval."""
    timeout = httpx.Timeout(settings.webhook_timeout_seconds)
    with (
        httpx.Client(timeout=timeout, follow_redirects=False) as client,
        ThreadPoolExecutor(settings.webhook_concurrency, thread_name_prefix="ftjobs-webhook") as pool,
    ):
        wait = settings.webhook_poll_seconds
        while not stopped.wait(wait):
            try:
                wait = 0 if deliver_due(settings, client, pool) == CLAIM_BATCH else settings.webhook_poll_seconds
            except Exception:  # the database is down: the next round tries again
                log.exception("webhook delivery round failed")
                wait = settings.webhook_poll_seconds
