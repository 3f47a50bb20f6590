"""Several API processes (`ftjobs api --workers N`) and one /metrics: every scrape, whichever process answers it,
shows the requests all of them served.

Each process's own share is read from its file in PROMETHEUS_MULTIPROC_DIR (given to the API here, as an
operator would, so the test can look inside), which shows that both processes served requests and answered
scrapes, and that the scraped total is their sum.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from harness import running_stack, wait_until
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ftjobs.cli import _metrics_shared_by

HEALTHZ = {"method": "GET", "route": "/healthz", "status": "200"}
HEALTHZ_DURATION = {"method": "GET", "route": "/healthz"}  # the histogram has no status label
METRICS = {"method": "GET", "route": "/metrics", "status": "200"}
ACCESS_LINE = '"GET /healthz HTTP/1.1" 200'
CONCURRENT_REQUESTS = 8  # several connections at once, so the kernel hands them to both processes


@pytest.mark.services  # `ftjobs api` processes, on the session's PostgreSQL and Redis
def test_two_api_processes_serve_one_consistent_metrics_view(tmp_path):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    stale = metrics_dir / "counter_1.db"
    stale.write_bytes(b"an earlier run's counts")  # must not be summed into this run's
    with running_stack(tmp_path) as stack:
        stack.start_api("--workers", "2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        assert not stale.exists()
        pids = wait_until(lambda: api_processes(metrics_dir, stack.api.pid), 60, "two API processes")
        sent = get_healthz_until_each_served(stack.url, metrics_dir, pids, at_least=37)
        # A request is counted just after its response is sent: wait for the last ones to reach the files.
        wait_until(lambda: sum(served(metrics_dir, HEALTHZ).values()) == sent, 10, f"{sent} requests counted")

        for scrape in range(100):
            text = httpx.get(f"{stack.url}/metrics", timeout=10).text
            assert sample(text, "ftjobs_http_requests_total", HEALTHZ) == sent, f"scrape {scrape}"
            assert sample(text, "ftjobs_http_request_duration_seconds_count", HEALTHZ_DURATION) == sent
            assert text.count("# HELP ftjobs_jobs ") == 1  # the state collector, once, not once per process
            assert sample(text, "ftjobs_jobs", {"state": "queued"}) == 0  # read from this stack's empty database
            if scrape >= 19 and all(served(metrics_dir, METRICS).get(pid) for pid in pids):
                break
        scrapes = served(metrics_dir, METRICS)
        assert all(scrapes.get(pid) for pid in pids), f"the scrapes were not answered by each process: {scrapes}"
        # The access log is on by default: one line per request, from both processes.
        wait_until(lambda: access_lines(stack.api.lines) == sent, 10, f"{sent} access log lines")


@pytest.mark.services  # `ftjobs api` processes, on the session's PostgreSQL and Redis
def test_web_concurrency_sets_the_processes_and_the_access_log_can_be_turned_off(tmp_path):
    metrics_dir = tmp_path / "prometheus"
    with running_stack(tmp_path) as stack:
        stack.start_api(WEB_CONCURRENCY="2", FTJOBS_ACCESS_LOG="false", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
        wait_until(lambda: api_processes(metrics_dir, stack.api.pid), 60, "two API processes")
        for _ in range(5):
            assert httpx.get(f"{stack.url}/healthz", timeout=10).status_code == 200
        wait_until(lambda: sum(served(metrics_dir, HEALTHZ).values()) == 5, 10, "5 requests counted")
        # The parent logs this last, after its children have exited: every line they wrote has been read by then.
        stack.api.signal_group(signal.SIGTERM)
        assert stack.api.process.wait(timeout=30) == 0
        wait_until(lambda: any("Stopping parent process" in line for line in stack.api.lines), 10, "the last line")
        assert access_lines(stack.api.lines) == 0


def test_several_processes_get_a_fresh_metrics_directory_removed_after_them(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with _metrics_shared_by(1):
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # one process keeps its metrics in memory
    with _metrics_shared_by(2):
        directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        assert directory.is_dir() and not any(directory.iterdir())
    assert not directory.exists() and "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def get_healthz_until_each_served(url: str, metrics_dir: Path, pids: set[int], at_least: int) -> int:
    """GET /healthz on fresh connections, in rounds, until each process has served some; the number sent."""
    sent = 0
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        for _ in range(40):
            statuses = list(
                pool.map(lambda _: httpx.get(f"{url}/healthz", timeout=10).status_code, range(CONCURRENT_REQUESTS))
            )
            assert statuses == [200] * CONCURRENT_REQUESTS
            sent += CONCURRENT_REQUESTS
            shares = served(metrics_dir, HEALTHZ)
            if sent >= at_least and all(shares.get(pid) for pid in pids):
                assert sum(shares.values()) == sent, shares
                return sent
    raise AssertionError(f"after {sent} requests not every process had served one: {served(metrics_dir, HEALTHZ)}")


def api_processes(metrics_dir: Path, parent_pid: int) -> set[int] | None:
    """The pids of the API processes that have written metrics: uvicorn's children of `ftjobs api`."""
    pids = {int(path.stem.removeprefix("counter_")) for path in metrics_dir.glob("counter_*.db")}
    children = {pid for pid in pids if parent_of(pid) == parent_pid}
    return children if len(children) == 2 else None


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state: the parent's pid


def served(metrics_dir: Path, labels: dict[str, str]) -> dict[int, float]:
    """Each process's own count of requests with these labels, from its file."""
    shares = {}
    for path in metrics_dir.glob("counter_*.db"):
        families = MultiProcessCollector.merge([str(path)])
        shares[int(path.stem.removeprefix("counter_"))] = sum(
            s.value
            for family in families
            for s in family.samples
            if s.name == "ftjobs_http_requests_total" and s.labels == labels
        )
    return shares


def sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


def access_lines(lines: list[str]) -> int:
    return sum(ACCESS_LINE in line for line in lines)
