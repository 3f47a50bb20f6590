"""Monitoring, end to end: the API's and the worker's /metrics as Prometheus parses them, a real Prometheus
scraping both while a job trains, every dashboard panel's query answered from it, and per-job series removed
when the job ends.

The tests share one scenario and run in file order: a short job runs to success, then a long job trains while
metrics are read, and finally it is cancelled.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
SHIPPED_PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "gpu-memory.json"

# Every documented metric: (type, unit suffix, where: "always" | "gpu" (left out without a GPU) | "running"
# (exists while a job runs) | "registered_gpu" (exists once a worker registered a GPU)).
API_METRICS = {
    "ftjobs_jobs": ("gauge", "", "always"),
    "ftjobs_job_submissions": ("counter", "", "always"),
    "ftjobs_planner_duration_seconds": ("histogram", "seconds", "always"),
    "ftjobs_http_request_duration_seconds": ("histogram", "seconds", "always"),
    "ftjobs_http_requests": ("counter", "", "always"),
    "ftjobs_queue_depth": ("gauge", "", "always"),  # the tests use Redis; the embedded broker has none
    "ftjobs_registered_gpus": ("gauge", "", "always"),
    "ftjobs_registered_gpu_memory_bytes": ("gauge", "bytes", "registered_gpu"),
    # Measured on GPU jobs only (a CPU worker's resident memory is no GPU peak): there once a GPU job succeeded.
    "ftjobs_planner_error_ratio": ("gauge", "ratio", "registered_gpu"),
    "ftjobs_planner_correction_ratio": ("gauge", "ratio", "registered_gpu"),
}
WORKER_METRICS = {
    "ftjobs_device_memory_used_bytes": ("gauge", "bytes", "always"),
    "ftjobs_device_memory_capacity_bytes": ("gauge", "bytes", "always"),
    "ftjobs_gpu_utilization_ratio": ("gauge", "ratio", "gpu"),
    "ftjobs_job_predicted_peak_bytes": ("gauge", "bytes", "running"),
    "ftjobs_job_memory_allocated_bytes": ("gauge", "bytes", "gpu"),
    "ftjobs_job_memory_reserved_bytes": ("gauge", "bytes", "gpu"),
    "ftjobs_job_memory_peak_bytes": ("gauge", "bytes", "running"),
    "ftjobs_job_resident_memory_bytes": ("gauge", "bytes", "running"),
    "ftjobs_job_tokens_per_second": ("gauge", "per_second", "running"),
    "ftjobs_job_step_duration_seconds": ("gauge", "seconds", "running"),
    "ftjobs_job_loss": ("gauge", "", "running"),
    "ftjobs_job_progress_ratio": ("gauge", "ratio", "running"),
    "ftjobs_job_eta_seconds": ("gauge", "seconds", "running"),
    "ftjobs_job_peak_memory_ratio": ("histogram", "ratio", "always"),
    "ftjobs_job_duration_seconds": ("histogram", "seconds", "always"),
    "ftjobs_job_out_of_memory": ("counter", "", "always"),
    "ftjobs_job_oom_recoveries": ("counter", "", "always"),
}
# Grafana's built-in interval variables, as Grafana would expand them for a 1-hour view at a 1 s scrape.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "1h"}


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    rows = [{"instruction": f"Say the number {i}.", "output": f"number {i} number {i}"} for i in range(24)]
    (data_root / "monitoring.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return "monitoring.jsonl"


@pytest.fixture(scope="module")
def client(api_server, admin_key):
    with httpx.Client(base_url=api_server, timeout=30, headers=admin_key.headers) as http:
        yield http


def spec(model_dir, dataset: str, max_steps: int) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "qlora",
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "max_steps": max_steps,
            "micro_batch_size": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-3,
            "logging_steps": 1,
        },
        "memory": {"optimizer": "paged_adamw_8bit"},
        "metadata": {"test": "monitoring"},
    }


def wait_for(client, job_id: str, done, what: str, timeout_seconds: float = 300) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"job {job_id} never {what}: {job}"
        time.sleep(0.3)


def families(url: str) -> dict:
    """Every ftjobs_ metric family at `url`, parsed by prometheus_client's own parser."""
    text = httpx.get(url, timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text) if family.name.startswith("ftjobs_")}


def worker_url(worker) -> str:
    return f"http://127.0.0.1:{worker.metrics_port}/metrics"


def has_gpu() -> bool:
    from worker.gpus import list_gpus

    return bool(list_gpus())


@pytest.fixture(scope="module")
def finished_job(prometheus, client, worker, tiny_model, dataset) -> dict:
    """A short job run to success while Prometheus watches (it feeds the planner-error histogram)."""
    response = client.post("/v1/jobs", json=spec(tiny_model, dataset, max_steps=3))
    assert response.status_code == 201, response.text
    job = wait_for(
        client, response.json()["id"], lambda j: j["status"] in {"succeeded", "failed", "cancelled"}, "ended"
    )
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def running_job(finished_job, client, tiny_model, dataset):
    """A long job in flight that has reported at least two steps (so the step time exists); cancelled after."""
    response = client.post("/v1/jobs", json=spec(tiny_model, dataset, max_steps=100_000))
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    wait_for(client, job_id, lambda j: (j.get("progress") or {}).get("step", 0) >= 2, "reported two steps")
    yield client.get(f"/v1/jobs/{job_id}").json()
    client.post(f"/v1/jobs/{job_id}/cancel")
    wait_for(client, job_id, lambda j: j["status"] in {"cancelled", "failed", "succeeded"}, "ended", 60)


def assert_documented(found: dict, documented: dict, present: set[str]) -> None:
    for name, (kind, unit, where) in documented.items():
        if where not in present:
            assert name not in found or not found[name].samples, f"{name} must be left out here, not faked"
            continue
        assert name in found, f"{name} is missing"
        family = found[name]
        assert family.type == kind, f"{name} is a {family.type}, documented as a {kind}"
        assert family.documentation.strip(), f"{name} has no HELP text"
        if unit:
            assert name.endswith(f"_{unit}"), f"{name} does not end with its unit _{unit}"
        assert not name.endswith("_total"), f"{name}: _total is for counter samples only"
        for sample in family.samples:
            if kind == "counter":
                assert sample.name == f"{name}_total", sample
            if kind == "histogram":
                assert sample.name in {f"{name}_bucket", f"{name}_count", f"{name}_sum"}, sample
    undocumented = set(found) - set(documented)
    assert not undocumented, f"metrics missing from the documented set: {undocumented}"


def test_api_metrics_are_documented_typed_and_named_by_unit(client, running_job):
    client.post("/v1/jobs", json={"base_model": "x", "unknown_field": 1})  # an invalid submission
    refused = client.post(
        "/v1/jobs",
        json={
            "base_model": "Qwen/Qwen2.5-7B",
            "dataset": {"path": "x.jsonl"},
            "method": "full",
            "resources": {"gpu_memory_gib": 1},
        },
    )
    assert refused.json()["code"] == "does_not_fit"
    found = families(f"{client.base_url}/metrics")
    registered = _registered_gpus(found) > 0
    assert_documented(found, API_METRICS, {"always"} | ({"registered_gpu"} if registered else set()))

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in found.values() for s in f.samples}
    assert samples[("ftjobs_job_submissions_total", (("outcome", "accepted"),))] >= 2
    assert samples[("ftjobs_job_submissions_total", (("outcome", "invalid"),))] >= 1
    assert samples[("ftjobs_job_submissions_total", (("outcome", "does_not_fit"),))] >= 1
    assert samples[("ftjobs_jobs", (("state", "running"),))] >= 1
    assert samples[("ftjobs_planner_duration_seconds_count", ())] >= 3
    routes = {s.labels["route"] for s in found["ftjobs_http_requests"].samples}
    assert {"/v1/jobs", "/v1/jobs/{job_id}"} <= routes  # templates, never a raw path with a job id in it
    assert not any(re.search(r"job_[0-9a-f]{24}", route) for route in routes)
    assert samples[("ftjobs_queue_depth", (("queue", _queue_name()),))] >= 0


def test_worker_metrics_are_documented_typed_and_named_by_unit(worker, running_job):
    found = families(worker_url(worker))
    gpu = has_gpu()
    assert_documented(found, WORKER_METRICS, {"always", "running"} | ({"gpu"} if gpu else set()))

    job_id = running_job["id"]
    per_job = {f.name: [s for s in f.samples if s.labels.get("job_id") == job_id] for f in found.values()}
    assert per_job["ftjobs_job_predicted_peak_bytes"][0].value == running_job["predicted_peak_bytes"]
    assert 0 < per_job["ftjobs_job_progress_ratio"][0].value < 1
    assert per_job["ftjobs_job_tokens_per_second"][0].value > 0
    assert per_job["ftjobs_job_step_duration_seconds"][0].value > 0
    assert per_job["ftjobs_job_resident_memory_bytes"][0].value > 50 * 2**20  # a real RSS: python + torch
    (peak,) = per_job["ftjobs_job_memory_peak_bytes"]
    assert peak.labels["device"] == ("gpu" if gpu else "cpu") and peak.value > 0
    devices = {s.labels["device"] for s in found["ftjobs_device_memory_used_bytes"].samples}
    if not gpu:  # the CPU path: host memory as device="cpu", and nothing that only a GPU has
        assert devices == {"cpu"}
        capacity = found["ftjobs_device_memory_capacity_bytes"].samples[0].value
        assert 0 < found["ftjobs_device_memory_used_bytes"].samples[0].value < capacity
        for name in (
            "ftjobs_job_memory_allocated_bytes",
            "ftjobs_job_memory_reserved_bytes",
            "ftjobs_gpu_utilization_ratio",
        ):
            assert name not in found or not found[name].samples

    # The short job that already succeeded: observed in the finished-job histograms.
    ratio = {
        s.labels["device"]: s.value for s in found["ftjobs_job_peak_memory_ratio"].samples if s.name.endswith("_count")
    }
    assert ratio["gpu" if gpu else "cpu"] >= 1
    durations = {
        s.labels["outcome"]: s.value for s in found["ftjobs_job_duration_seconds"].samples if s.name.endswith("_count")
    }
    assert durations["succeeded"] >= 1


def test_every_dashboard_panel_query_returns_series_from_prometheus(prometheus, worker, running_job):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "GPU memory"
    queries = {
        f"{panel['title']} [{target['refId']}]": _expand(target["expr"])
        for panel in dashboard["panels"]
        for target in panel["targets"]
    }
    assert len(dashboard["panels"]) >= 6
    if not has_gpu():  # a panel of GPU-only metrics has nothing to show here, and its metrics are left out
        queries = {title: expr for title, expr in queries.items() if not set(_metrics_in(expr)) <= _gpu_only()}
    # Wait for scrapes that saw the running job (and enough of them for rate/increase), then ask every query.
    deadline = time.monotonic() + 60
    while True:
        empty = {title: expr for title, expr in queries.items() if not _query(prometheus, expr)}
        if not empty:
            break
        assert time.monotonic() < deadline, f"panel queries with no series: {empty}"
        time.sleep(1)
    running = _query(prometheus, f'ftjobs_job_predicted_peak_bytes{{job_id="{running_job["id"]}"}}')
    assert running and float(running[0]["value"][1]) == running_job["predicted_peak_bytes"]
    targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {"ftjobs-api": "up", "ftjobs-worker": "up"}


def test_promtool_accepts_the_shipped_prometheus_config():
    result = subprocess.run(
        ["promtool", "check", "config", str(SHIPPED_PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_per_job_series_are_removed_when_the_job_ends(client, worker, finished_job, running_job):
    job_id = running_job["id"]
    assert _job_ids(worker) == {job_id}  # only the running job: the finished one's series are gone already
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    wait_for(client, job_id, lambda j: j["status"] == "cancelled", "was cancelled", 60)
    deadline = time.monotonic() + 10  # the worker records the outcome just after the state change
    while _job_ids(worker):
        assert time.monotonic() < deadline, f"per-job series outlived the job: {_job_ids(worker)}"
        time.sleep(0.2)
    durations = {
        s.labels["outcome"]: s.value
        for s in families(worker_url(worker))["ftjobs_job_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert durations["cancelled"] >= 1


def _job_ids(worker) -> set[str]:
    return {
        s.labels["job_id"] for f in families(worker_url(worker)).values() for s in f.samples if "job_id" in s.labels
    }


def _metrics_in(expr: str) -> list[str]:
    return re.findall(r"\bftjobs_[a-z_]+", expr)


def _gpu_only() -> set[str]:
    metrics = API_METRICS | WORKER_METRICS
    return {name for name, (_, _, where) in metrics.items() if where in {"gpu", "registered_gpu"}}


def _registered_gpus(found: dict) -> float:
    return found["ftjobs_registered_gpus"].samples[0].value


def _queue_name() -> str:
    from service.settings import get_settings

    return get_settings().queue_name


def _expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
    return expr


def _query(prometheus: str, expr: str) -> list:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    return body["data"]["result"]
