"""The worker's background duties: heartbeat its GPUs and run the reconciler, every reconcile interval."""

from __future__ import annotations

import logging
import threading

from service.db import in_transaction
from service.jobs import repository
from service.jobs.reconcile import reconcile
from service.settings import Settings

log = logging.getLogger(__name__)


def start_maintenance(hostname: str, settings: Settings) -> threading.Event:
    """A daemon thread; set the returned event to end it."""
    stopped = threading.Event()

    def loop() -> None:
        while not stopped.wait(settings.reconcile_interval_seconds):
            try:
                in_transaction(lambda session: repository.heartbeat_gpus(session, hostname))
                report = reconcile(settings)
            except Exception:  # the database or broker is down: the next round tries again
                log.exception("maintenance round failed")
                continue
            if report.requeued or report.ended or report.resent or report.expired_gpus:
                log.info("reconciled: %s", report)

    threading.Thread(target=loop, name="ftjobs-maintenance", daemon=True).start()
    return stopped
