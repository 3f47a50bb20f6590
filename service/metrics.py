"""The API process's Prometheus metrics, served at /metrics (service/app.py).

Counters and histograms are updated as requests happen. Whatever the database or the broker already knows
(jobs by state, registered GPUs, queue depth, the planner's accuracy) is read at scrape time by
`ServiceStateCollector`, so it is always the truth of the moment and costs one GROUP BY, two small SELECTs (the
planner's over the measurements index) and one LLEN per scrape.

Conventions (the README's Monitoring section lists every metric): the `ftjobs_` prefix, base units in the
name (`_seconds`, `_bytes`), `_total` only on counters, HELP on every metric, and labels whose values come from
closed sets: a route label is the route *template* (`/v1/jobs/{job_id}`), never the raw path.

With several API processes (`ftjobs api --workers N`) prometheus_client runs in multiprocess mode: counters and
histograms live in files shared by the processes, and a scrape sums them. Gauges would each need a
multiprocess_mode there; keep state as a scrape-time collector instead, as `ServiceStateCollector` does.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from prometheus_client import REGISTRY, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from domain.errors import DomainError
from domain.states import JobStatus
from service.errors import DoesNotFit, http_status
from service.settings import Settings

log = logging.getLogger(__name__)
# Read at import, as prometheus_client itself reads it: when set, every counter and histogram below writes to a
# file there (cli.py sets it for several API processes). Not a setting: the library takes it from the environment.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
# The *_created series would double every counter and histogram for a timestamp no panel or alert reads.
disable_created_metrics()

SUBMISSION_OUTCOMES = ("accepted", "does_not_fit", "invalid")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"  # every path no route matched shares one label value: a scanner cannot add series

JOB_SUBMISSIONS = Counter(
    "ftjobs_job_submissions",
    "Job submissions (POST /v1/jobs) by outcome: accepted and queued, refused because "
    "the plan does not fit the GPU, or refused as invalid (spec, model or dataset).",
    ["outcome"],
)
for _outcome in SUBMISSION_OUTCOMES:
    JOB_SUBMISSIONS.labels(_outcome)  # exported as 0 from the start, so the first refusal shows in rate()

PLANNER_DURATION = Histogram(
    "ftjobs_planner_duration_seconds",
    "Time the memory planner took to plan one spec (submissions and dry runs).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

HTTP_REQUEST_DURATION = Histogram(
    "ftjobs_http_request_duration_seconds",
    "HTTP request duration by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
HTTP_REQUESTS = Counter(
    "ftjobs_http_requests", "HTTP requests by method, route template and status code.", ["method", "route", "status"]
)


class SubmissionRoute(APIRoute):
    """The POST /v1/jobs route, counting each submission's outcome.

    A route class rather than code in the endpoint, because a spec that fails schema validation is refused
    by FastAPI before the endpoint runs; it still counts as an `invalid` submission.
    """

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def counted(request):
            try:
                response = await handler(request)
            except DoesNotFit:
                JOB_SUBMISSIONS.labels("does_not_fit").inc()
                raise
            except RequestValidationError:
                JOB_SUBMISSIONS.labels("invalid").inc()
                raise
            except DomainError as error:
                if 400 <= http_status(error) < 500:  # a server-side failure (queue down) is not the submitter's doing
                    JOB_SUBMISSIONS.labels("invalid").inc()
                raise
            if response.status_code < 300:
                JOB_SUBMISSIONS.labels("accepted").inc()
            return response

        return counted


class HttpMetricsMiddleware:
    """Duration and count of every HTTP request, labelled by the route template the router matched."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before starting a response

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router stores the matched route in the scope it was given, which is this very dict.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED_ROUTE
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            _duration_of(method, route).observe(time.perf_counter() - started)
            _count_of(method, route, status).inc()


# The labelled children, looked up once per label set rather than through labels() on every request; the label
# sets are closed (methods, route templates, status codes), so these stay small.
@functools.cache
def _duration_of(method: str, route: str):
    return HTTP_REQUEST_DURATION.labels(method, route)


@functools.cache
def _count_of(method: str, route: str, status: int):
    return HTTP_REQUESTS.labels(method, route, str(status))


class ServiceStateCollector(Collector):
    """Jobs by state, registered GPUs and queue depth, read from the database and the broker at scrape time.

    A source that cannot be read is left out of that scrape (and logged) rather than reported as zero.
    """

    def __init__(self) -> None:
        self.settings: Settings | None = None
        # The API's own engine (set by its lifespan): the scrape shares the request pool, no second pool per process.
        self.engine = None

    def describe(self):
        # Without describe(), registering would call collect() and query the database at import time.
        return [GaugeMetricFamily(name, text) for name, text in _STATE_HELP.items()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.settings is None or self.engine is None:
            return
        try:
            yield from self._from_database()
        except Exception:
            log.warning("metrics: the database could not be read; job and GPU series left out", exc_info=True)
        try:
            yield from self._from_broker()
        except Exception:
            log.warning("metrics: the broker could not be read; queue depth left out", exc_info=True)

    def _from_database(self) -> Iterator[GaugeMetricFamily]:
        from sqlalchemy.orm import Session

        from service.calibration.service import accuracy_by_family
        from service.gpus import live_gpus
        from service.jobs import repository

        # expire_on_commit off: the GPU rows are read after the commit, when the series are built.
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            counts = repository.count_jobs_by_status(session)
            gpus = live_gpus(session, self.settings)
            accuracy = accuracy_by_family(session)
        jobs = GaugeMetricFamily("ftjobs_jobs", _STATE_HELP["ftjobs_jobs"], labels=["state"])
        for state in JobStatus:  # every state, 0 included: "no failed jobs" is a reading, and alerts need it
            jobs.add_metric([state.value], counts.get(state.value, 0))
        registered = GaugeMetricFamily("ftjobs_registered_gpus", _STATE_HELP["ftjobs_registered_gpus"])
        registered.add_metric([], len(gpus))
        memory = GaugeMetricFamily(
            "ftjobs_registered_gpu_memory_bytes",
            _STATE_HELP["ftjobs_registered_gpu_memory_bytes"],
            labels=["worker", "gpu", "model"],
        )
        for gpu in gpus:
            memory.add_metric([gpu.worker_hostname, str(gpu.device_index), gpu.name], gpu.total_memory_bytes)
        yield from (jobs, registered, memory, *_planner_accuracy(accuracy))

    def _from_broker(self) -> Iterator[GaugeMetricFamily]:
        from service.queue import queue_depth

        depth = queue_depth(self.settings)
        if depth is None:  # the embedded SQLite broker has no cheap depth; no series rather than a fake 0
            return
        family = GaugeMetricFamily("ftjobs_queue_depth", _STATE_HELP["ftjobs_queue_depth"], labels=["queue"])
        family.add_metric([self.settings.queue_name], depth)
        yield family


def _planner_accuracy(rows: list) -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
    """The planner's error per (GPU model, recipe family): both label sets are closed (the workers' GPU models,
    and families built from the spec's enums). `rows`: service.calibration.service.FamilyAccuracy."""
    labels = ["gpu_model", "family"]
    error = GaugeMetricFamily(
        "ftjobs_planner_error_ratio", _STATE_HELP["ftjobs_planner_error_ratio"], labels=[*labels, "stat"]
    )
    correction = GaugeMetricFamily(
        "ftjobs_planner_correction_ratio", _STATE_HELP["ftjobs_planner_correction_ratio"], labels=labels
    )
    for row in rows:
        error.add_metric([row.gpu_model, row.family, "median"], row.accuracy.median_error_ratio)
        error.add_metric([row.gpu_model, row.family, "worst"], row.accuracy.worst_error_ratio)
        correction.add_metric([row.gpu_model, row.family], row.correction.ratio if row.correction else 1.0)
    return error, correction


_STATE_HELP = {
    "ftjobs_jobs": "Jobs in the database by state.",
    "ftjobs_registered_gpus": "GPUs registered by the workers that are up.",
    "ftjobs_registered_gpu_memory_bytes": "Total memory of each GPU a worker registered.",
    "ftjobs_queue_depth": "Job messages waiting in the broker queue, not yet taken by a worker.",
    "ftjobs_planner_error_ratio": "The planner's error on finished GPU jobs (measured / predicted peak - 1), "
    "median or worst (furthest from 0), over the newest 200 jobs of each GPU model and recipe family.",
    "ftjobs_planner_correction_ratio": "The factor the planner multiplies its peak by for a GPU model and recipe "
    "family, learned from finished jobs; 1 while there is none.",
}

STATE_COLLECTOR = ServiceStateCollector()
REGISTRY.register(STATE_COLLECTOR)


def registry_to_scrape() -> CollectorRegistry:
    """What /metrics serves: this process's registry, or in multiprocess mode the sum of every API process's
    files plus the state collector, which whichever process answers reads once from the database."""
    if not MULTIPROCESS_DIR:
        return REGISTRY
    # A fresh registry per scrape, holding none of this process's own metrics, as prometheus_client's
    # multiprocess docs require: those are already in the files, and would be exported twice.
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=MULTIPROCESS_DIR)
    registry.register(STATE_COLLECTOR)
    return registry


def install(app, settings: Settings) -> None:
    """Measure `app`'s requests and point the scrape-time collector at `settings` (one collector per process)."""
    STATE_COLLECTOR.settings = settings
    app.add_middleware(HttpMetricsMiddleware)
