"""Real servers for the monitoring tests: the API under uvicorn (Prometheus needs a real HTTP target) and a
Prometheus built from the shipped deploy/prometheus/prometheus.yml, scraping the API and the test worker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from harness import wait_until_serving

REPO = Path(__file__).resolve().parents[2]
SHIPPED_PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
SCRAPE_INTERVAL = "1s"  # fast enough that a test sees several scrapes, so rate() and increase() have samples


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def api_server(database, redis_client) -> Iterator[str]:
    """`service.app:create_app` under uvicorn on a free port, with the test session's settings (environment)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=os.environ.copy(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/healthz", process, "the API")
        yield url
    finally:
        _stop(process)


def scrape_config_for_test(shipped: dict, targets: dict[str, str]) -> dict:
    """The shipped scrape jobs (names, paths), pointed at this test's servers and scraped every second."""
    jobs = []
    for job in shipped["scrape_configs"]:
        job = {key: value for key, value in job.items() if not key.endswith("_sd_configs")}
        job.update(
            static_configs=[{"targets": [targets[job["job_name"]]]}],
            scrape_interval=SCRAPE_INTERVAL,
            scrape_timeout=SCRAPE_INTERVAL,
        )
        jobs.append(job)
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": jobs,
    }


@pytest.fixture(scope="session")
def prometheus(api_server, worker, tmp_path_factory) -> Iterator[str]:
    """A real Prometheus (the Debian package's binary, our own process and port) scraping the API and worker."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed; scripts/services installs it (apt-get install prometheus)")
    home = tmp_path_factory.mktemp("prometheus")
    shipped = yaml.safe_load(SHIPPED_PROMETHEUS_CONFIG.read_text())
    targets = {"ftjobs-api": api_server.removeprefix("http://"), "ftjobs-worker": f"127.0.0.1:{worker.metrics_port}"}
    config = home / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config_for_test(shipped, targets)))
    port = free_port()
    log = (home / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/-/ready", process, "prometheus")
        yield url
    finally:
        _stop(process)
        log.close()
