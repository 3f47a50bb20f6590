"""The Celery application of a GPU worker.

Ack policy: early acknowledgement (task_acks_late=False). Redis redelivers any message not acknowledged within
visibility_timeout (1 h by default, celery#5935); with late acks a training job longer than that would be
handed to a second worker while the first is still training. Acking on receipt means a long job's message is
never redelivered. The jobs table, not the broker, guarantees exactly-once starts: every delivery must win the
guarded `UPDATE jobs SET status='running' WHERE status='queued'`, so even a redelivered or duplicated message is
a no-op. A message lost anyway (the worker died between ack and claim, Redis restarted empty) is re-sent by
the reconciler once its job has been queued past the grace period, and a worker that dies mid-job loses its
lease, so the reconciler hands the job to a new attempt (service/jobs/reconcile.py). The reconciler runs in
every worker process (worker/maintenance.py).

One task per device slot (worker/slots.py): a worker with one GPU (or one CPU slot) runs the solo pool, one
job at a time; with more, a thread per slot, each thread the parent of one job's training processes (the
training itself runs in those processes, so the threads only relay). No prefetch: a prefetched message would
wait behind a long job while another worker's GPU sits idle. A job needing N slots waits in this worker's line
(first come, first served) until N are free.
"""

from __future__ import annotations

import logging

from celery import Celery, signals

from service.broker import celery_config
from service.db import in_transaction
from service.jobs import repository
from service.settings import get_settings
from worker import metrics as worker_metrics
from worker.execution import requeue_orphans
from worker.gpus import list_gpus
from worker.maintenance import start_maintenance
from worker.shutdown import install_drain_handlers
from worker.slots import worker_slots

log = logging.getLogger(__name__)


# This worker's devices: one slot per GPU NVML sees, or FTJOBS_CPU_RANKS CPU slots.
DEVICE_SLOTS = worker_slots([gpu.index for gpu in list_gpus()], get_settings().cpu_ranks)


def create_celery() -> Celery:
    settings = get_settings()
    app = Celery("ftjobs-worker", include=["worker.tasks"])
    app.conf.update(
        celery_config(settings),
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        # Redis only: fetch a message only when the worker is free (Celery ≥ 5.6).
        worker_disable_prefetch=settings.redis_url is not None,
        worker_concurrency=DEVICE_SLOTS.size,
        worker_pool="solo" if DEVICE_SLOTS.size == 1 else "threads",
        worker_hijack_root_logger=False,
    )
    return app


app = create_celery()


@signals.worker_ready.connect
def _on_ready(sender, **_kwargs) -> None:
    hostname, settings = sender.hostname, get_settings()
    gpus = [(g.index, g.name, g.total_memory_bytes) for g in list_gpus()]
    in_transaction(lambda session: repository.register_gpus(session, hostname, gpus))
    install_drain_handlers()
    start_maintenance(hostname, settings)
    log.info(
        "worker %s ready with %s; %d device slot(s)",
        hostname,
        [g[1] for g in gpus] or "no GPU (training runs on the CPU)",
        DEVICE_SLOTS.size,
    )
    if settings.worker_metrics_port:
        worker_metrics.serve(settings.worker_metrics_port, settings.worker_metrics_host)
    for job_id in requeue_orphans(hostname, settings):
        log.warning("job %s was running when this worker last stopped; handed to a new attempt", job_id)


@signals.worker_shutdown.connect
def _on_shutdown(sender, **_kwargs) -> None:
    in_transaction(lambda session: repository.unregister_gpus(session, sender.hostname))
