"""A worker's Prometheus metrics: its training device and the job it is running.

Served by the worker's own HTTP server on settings.worker_metrics_port (started from worker/celery_app.py when
the Celery worker is ready). worker/execution.py reports each job's life: job_started, job_progress for every
progress message the training child sends, job_finished.

- Device memory is read at scrape time: NVML per GPU (`device="gpu0"`, ...); on a worker without a GPU, where
  training runs on the CPU, host memory (`device="cpu"`). NVML utilisation is exported only where NVML has it.
- Per-job gauges carry a `job_id` label only while the job runs: job_finished removes them (and job_started
  removes any a crashed supervisor left behind), so series stay bounded by the one job a worker runs at a time.
- Figures that cannot exist on the device are left out, never exported as zero: torch's allocated and
  reserved bytes exist only on a GPU. On the CPU, the memory used for training is the job process's resident
  set, so the per-job peak and the actual÷predicted ratio use its peak RSS there, labelled `device="cpu"`.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.gpus import list_gpus, read_gpus

log = logging.getLogger(__name__)
# The *_created series would double every counter and histogram for a timestamp no panel or alert reads.
disable_created_metrics()

DEVICE_KINDS = ("gpu", "cpu")
OUTCOMES = ("succeeded", "failed", "cancelled")

# The worker's own registry, not prometheus_client's global one: what it serves is its metrics alone, whatever the
# service modules it imports register (the sweep driver plans jobs, and the planner's API metrics come along). The
# process and platform collectors are added to it as the global registry has them.
REGISTRY = CollectorRegistry()
for _collector in (ProcessCollector, PlatformCollector, GCCollector):
    _collector(registry=REGISTRY)

# --- per running job (label job_id, removed when the job ends) ------------------------------------------
JOB_PREDICTED_PEAK = Gauge(
    "ftjobs_job_predicted_peak_bytes",
    "The planner's predicted peak memory of a running job.",
    ["job_id"],
    registry=REGISTRY,
)
JOB_MEMORY_ALLOCATED = Gauge(
    "ftjobs_job_memory_allocated_bytes",
    "GPU memory torch has allocated to tensors of a running job (GPU only).",
    ["job_id"],
    registry=REGISTRY,
)
JOB_MEMORY_RESERVED = Gauge(
    "ftjobs_job_memory_reserved_bytes",
    "GPU memory torch's caching allocator holds for a running job (GPU only).",
    ["job_id"],
    registry=REGISTRY,
)
JOB_MEMORY_PEAK = Gauge(
    "ftjobs_job_memory_peak_bytes",
    "Peak memory of a running job so far: torch's peak reserved GPU memory (device=gpu), or the "
    "training process's peak resident set when it trains on the CPU (device=cpu).",
    ["job_id", "device"],
    registry=REGISTRY,
)
JOB_RESIDENT = Gauge(
    "ftjobs_job_resident_memory_bytes",
    "Resident set size (host memory) of a running job's training process.",
    ["job_id"],
    registry=REGISTRY,
)
JOB_TOKENS_PER_SECOND = Gauge(
    "ftjobs_job_tokens_per_second",
    "Non-padding tokens per second of training so far, for a running job.",
    ["job_id"],
    registry=REGISTRY,
)
JOB_STEP_DURATION = Gauge(
    "ftjobs_job_step_duration_seconds",
    "Mean wall time of one optimizer step between a running job's last two progress "
    "reports (absent until the second report).",
    ["job_id"],
    registry=REGISTRY,
)
JOB_LOSS = Gauge(
    "ftjobs_job_loss", "Mean per-token training loss since the previous progress report.", ["job_id"], registry=REGISTRY
)
JOB_PROGRESS = Gauge(
    "ftjobs_job_progress_ratio",
    "Optimizer steps completed / total steps, for a running job.",
    ["job_id"],
    registry=REGISTRY,
)
JOB_ETA = Gauge(
    "ftjobs_job_eta_seconds",
    "Estimated time left to the end of training, for a running job.",
    ["job_id"],
    registry=REGISTRY,
)
_PER_JOB = (
    JOB_PREDICTED_PEAK,
    JOB_MEMORY_ALLOCATED,
    JOB_MEMORY_RESERVED,
    JOB_RESIDENT,
    JOB_TOKENS_PER_SECOND,
    JOB_STEP_DURATION,
    JOB_LOSS,
    JOB_PROGRESS,
    JOB_ETA,
)

# --- per finished job ------------------------------------------------------------------------------------
PEAK_RATIO = Histogram(
    "ftjobs_job_peak_memory_ratio",
    "Measured peak memory ÷ the planner's predicted peak, per succeeded job: above 1 the planner under-predicted. "
    "device=gpu measures what NVML shows for the process; device=cpu the process's peak resident set.",
    ["device"],
    buckets=(0.25, 0.5, 0.75, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0),
    registry=REGISTRY,
)
JOB_DURATION = Histogram(
    "ftjobs_job_duration_seconds",
    "Wall time of a job on the worker, from claim to outcome, by outcome.",
    ["outcome"],
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400),
    registry=REGISTRY,
)
OUT_OF_MEMORY = Counter(
    "ftjobs_job_out_of_memory",
    "Training attempts that ran out of memory (error code out_of_memory), recovered or not; "
    "device=gpu counts CUDA out-of-memory errors.",
    ["device"],
    registry=REGISTRY,
)
OOM_RECOVERED = Counter(
    "ftjobs_job_oom_recoveries",
    "Attempts that ran out of memory and whose job was re-planned and requeued to resume (planner/recovery.py).",
    ["device"],
    registry=REGISTRY,
)


@dataclass
class _RunningJob:
    predicted_peak_bytes: int | None
    last_step: int | None = None
    last_report_at: float | None = None
    peak_resident_bytes: int | None = None


_running: dict[str, _RunningJob] = {}


@lru_cache(maxsize=1)
def training_device_kind() -> str:
    """'gpu' when NVML sees a GPU (training uses it), else 'cpu'. Fixed for the worker's lifetime."""
    return "gpu" if list_gpus() else "cpu"


def job_started(job_id: str, predicted_peak_bytes: int | None) -> None:
    _running[job_id] = _RunningJob(predicted_peak_bytes)
    if predicted_peak_bytes:
        JOB_PREDICTED_PEAK.labels(job_id).set(predicted_peak_bytes)


def job_progress(job_id: str, progress: dict[str, Any]) -> None:
    """One progress message from the training child (worker/training/recipe.py Progress plus the process's RSS)."""
    job = _running.setdefault(job_id, _RunningJob(None))
    step, total = progress.get("step"), progress.get("total_steps")
    if step is not None and total:
        JOB_PROGRESS.labels(job_id).set(step / total)
    for gauge, key in (
        (JOB_LOSS, "loss"),
        (JOB_TOKENS_PER_SECOND, "tokens_per_second"),
        (JOB_ETA, "eta_seconds"),
        (JOB_MEMORY_ALLOCATED, "memory_allocated_bytes"),
        (JOB_MEMORY_RESERVED, "memory_reserved_bytes"),
        (JOB_RESIDENT, "process_resident_bytes"),
    ):
        if progress.get(key) is not None:  # None means "does not exist here" (torch memory on the CPU)
            gauge.labels(job_id).set(progress[key])
    if progress.get("process_peak_resident_bytes") is not None:
        job.peak_resident_bytes = progress["process_peak_resident_bytes"]
    if progress.get("memory_peak_bytes") is not None:
        JOB_MEMORY_PEAK.labels(job_id, "gpu").set(progress["memory_peak_bytes"])
    elif job.peak_resident_bytes is not None:
        JOB_MEMORY_PEAK.labels(job_id, "cpu").set(job.peak_resident_bytes)
    now = time.monotonic()
    if step is not None:
        # Measured here, between reports, because the child reports only rates: the first report has no
        # predecessor, and model loading before it is not a step.
        if job.last_step is not None and step > job.last_step:
            JOB_STEP_DURATION.labels(job_id).set((now - job.last_report_at) / (step - job.last_step))
        job.last_step, job.last_report_at = step, now


def job_finished(
    job_id: str,
    outcome: str | None,
    duration_seconds: float,
    measured_peak_bytes: int | None = None,
    predicted_peak_bytes: int | None = None,
    error_code: str | None = None,
) -> None:
    """Record a job's outcome and remove its per-job series.

    `measured_peak_bytes` is the GPU measurement the worker stores on the job (None on the CPU, where the
    process's peak RSS from its last progress report stands in). Only succeeded jobs feed the ratio: a failed
    or cancelled job may have stopped before reaching its peak.
    """
    job = _running.get(job_id) or _RunningJob(predicted_peak_bytes)
    _remove_job_series(job_id)
    if outcome in OUTCOMES:
        JOB_DURATION.labels(outcome).observe(duration_seconds)
    if error_code == "out_of_memory":
        OUT_OF_MEMORY.labels(training_device_kind()).inc()
        if outcome == "queued":
            OOM_RECOVERED.labels(training_device_kind()).inc()
    predicted = predicted_peak_bytes or job.predicted_peak_bytes
    if measured_peak_bytes is not None:
        measured, device = measured_peak_bytes, "gpu"
    else:
        measured, device = job.peak_resident_bytes, "cpu"
    if outcome == "succeeded" and measured and predicted:
        PEAK_RATIO.labels(device).observe(measured / predicted)


def _remove_job_series(job_id: str) -> None:
    _running.pop(job_id, None)
    for gauge in _PER_JOB:
        with suppress(KeyError):  # a gauge this job never set has no series to remove
            gauge.remove(job_id)
    for device in DEVICE_KINDS:
        with suppress(KeyError):
            JOB_MEMORY_PEAK.remove(job_id, device)


class DeviceCollector(Collector):
    """Memory (and utilisation, where NVML has it) of the device this worker trains on, read at scrape time."""

    def describe(self):
        return [GaugeMetricFamily(name, text) for name, text in _DEVICE_HELP.items()]

    def collect(self):
        used = GaugeMetricFamily(
            "ftjobs_device_memory_used_bytes", _DEVICE_HELP["ftjobs_device_memory_used_bytes"], labels=["device"]
        )
        capacity = GaugeMetricFamily(
            "ftjobs_device_memory_capacity_bytes",
            _DEVICE_HELP["ftjobs_device_memory_capacity_bytes"],
            labels=["device"],
        )
        utilization = GaugeMetricFamily(
            "ftjobs_gpu_utilization_ratio", _DEVICE_HELP["ftjobs_gpu_utilization_ratio"], labels=["device"]
        )
        try:
            gpus = read_gpus()
        except Exception:  # a driver hiccup must not fail the whole scrape; the series are simply absent
            log.warning("metrics: NVML could not be read", exc_info=True)
            return
        for gpu in gpus:
            device = f"gpu{gpu.index}"
            used.add_metric([device], gpu.used_memory_bytes)
            capacity.add_metric([device], gpu.total_memory_bytes)
            if gpu.utilization_ratio is not None:
                utilization.add_metric([device], gpu.utilization_ratio)
        if not gpus and training_device_kind() == "cpu":
            host = host_memory()
            if host is not None:
                used.add_metric(["cpu"], host[0])
                capacity.add_metric(["cpu"], host[1])
        yield from (family for family in (used, capacity, utilization) if family.samples)


_DEVICE_HELP = {
    "ftjobs_device_memory_used_bytes": "Memory in use on a training device: NVML's used memory per GPU "
    "(every process), or host memory in use (total − available) for the CPU.",
    "ftjobs_device_memory_capacity_bytes": "Total memory of a training device: a GPU's memory, or the host's "
    "for the CPU. Named capacity because _total is kept for counters.",
    "ftjobs_gpu_utilization_ratio": "Fraction of the last sample period in which the GPU ran a kernel (NVML).",
}


def host_memory() -> tuple[int, int] | None:
    """(used, total) host memory in bytes from /proc/meminfo; None where there is none to read."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return total - available, total


REGISTRY.register(DeviceCollector())


def serve(port: int, host: str = "127.0.0.1") -> bool:
    """Start the worker's /metrics server; False (logged) if the port is taken, so the worker still trains."""
    device = training_device_kind()
    # Exported as 0 from the start, for this worker's device only: a series for a device it lacks would be a lie.
    PEAK_RATIO.labels(device)
    OUT_OF_MEMORY.labels(device)
    OOM_RECOVERED.labels(device)
    for outcome in OUTCOMES:
        JOB_DURATION.labels(outcome)
    try:
        start_http_server(port, addr=host, registry=REGISTRY)
    except OSError as exc:
        log.error("worker metrics could not listen on port %d: %s (set FTJOBS_WORKER_METRICS_PORT)", port, exc)
        return False
    log.info("worker metrics on %s:%d/metrics", host, port)
    return True
