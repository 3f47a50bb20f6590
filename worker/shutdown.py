"""Graceful drain: the first SIGTERM or SIGINT asks the running job to checkpoint and go back to the queue;
a second one stops it at once (it is still requeued, resuming from its last checkpoint).

Celery's own handlers would wait for the task to end (a training job: hours) or cancel it outright; these
replace them once the worker is ready, and still tell Celery to stop taking work and exit when the task
returns.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class ShutdownRequest:
    def __init__(self) -> None:
        self.drain = threading.Event()
        self.stop_now = threading.Event()

    def signalled(self) -> None:
        if self.drain.is_set():
            self.stop_now.set()
        self.drain.set()


SHUTDOWN = ShutdownRequest()  # the one per worker process; worker/tasks.py hands it to execute_job


def install_drain_handlers(shutdown: ShutdownRequest = SHUTDOWN) -> None:
    def on_signal(signum, _frame) -> None:
        from celery.worker import state

        first = not shutdown.drain.is_set()
        shutdown.signalled()
        state.should_stop = 0  # EX_OK: a warm stop, as soon as the running task returns
        log.warning(
            "%s: %s",
            signal.Signals(signum).name,
            "draining the running job (checkpoint, then back to the queue); send again to stop at once"
            if first
            else "stopping the running job now; it goes back to the queue",
        )

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
