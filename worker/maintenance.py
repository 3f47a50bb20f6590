"""The worker's background duties: heartbeat its GPUs, run the reconciler and advance the sweeps
(service/sweeps/driver.py), every reconcile interval, and
prune old progress events and idempotency keys every PRUNE_INTERVAL_SECONDS; and, in a thread of its own, send
webhooks."""

from __future__ import annotations

import logging
import threading
import time

from service.db import in_transaction
from service.jobs import repository
from service.jobs.reconcile import prune_idempotency_keys, prune_progress_events, reconcile
from service.settings import Settings
from service.sweeps.driver import advance_sweeps
from service.webhooks.delivery import run_deliveries

log = logging.getLogger(__name__)
# Retention is counted in days: checking every ten minutes is plenty, and keeps the scan off every round.
PRUNE_INTERVAL_SECONDS = 600.0


def start_maintenance(hostname: str, settings: Settings) -> threading.Event:
    """A daemon thread; set the returned event to end it."""
    stopped = threading.Event()

    def loop() -> None:
        next_prune = time.monotonic()
        while not stopped.wait(settings.reconcile_interval_seconds):
            try:
                in_transaction(lambda session: repository.heartbeat_gpus(session, hostname))
                report = reconcile(settings)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
                    if deleted := prune_progress_events(settings):
                        log.info("deleted %d progress events past their retention", deleted)
                    if deleted := prune_idempotency_keys(settings):
                        log.info("deleted %d idempotency keys past their %g h", deleted, settings.idempotency_key_hours)
            except Exception:  # the database or broker is down: the next round tries again
                log.exception("maintenance round failed")
                continue
            if report.requeued or report.ended or report.resent or report.expired_gpus:
                log.info("reconciled: %s", report)
            try:  # apart from the reconciler's round: a sweep's failure never holds up the jobs
                advance_sweeps(settings)
            except Exception:
                log.exception("sweep round failed")

    threading.Thread(target=loop, name="ftjobs-maintenance", daemon=True).start()
    # Its own thread: a slow webhook receiver never delays the reconciler (service/webhooks/delivery.py).
    threading.Thread(target=run_deliveries, args=(stopped, settings), name="ftjobs-webhooks", daemon=True).start()
    return stopped
