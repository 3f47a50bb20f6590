"""Shared fixtures: a fresh PostgreSQL database built by the real migrations, real Redis, a real Celery worker.

Each test session creates its own database and queue and drops them at the end, so runs never share state
with each other or with the machine's `test` database.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import redis
from harness import RUN_ID, TestKey, WorkerProcess

PG_ADMIN_URL = os.environ.get("FTJOBS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FTJOBS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
DB_NAME = f"ftjobs_test_{RUN_ID}"
HOME = Path(os.environ.get("FTJOBS_TEST_HOME", f"/tmp/ftjobs-test-{RUN_ID}"))

# Set before any ftjobs module reads its settings; every process the tests start inherits them.
os.environ.update(
    {
        "FTJOBS_DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{DB_NAME}",
        "FTJOBS_REDIS_URL": REDIS_URL,
        "FTJOBS_HOME": str(HOME),
        "FTJOBS_QUEUE_NAME": f"training-{RUN_ID}",
        "FTJOBS_CANCEL_POLL_SECONDS": "0.2",
        "FTJOBS_LOG_LEVEL": "INFO",
    }
)


# Every fixture that reaches PostgreSQL or Redis does so through one of these: a test that uses neither, directly
# or through other fixtures, runs with both stopped (`pytest -m "not services"`).
SERVICE_FIXTURES = frozenset({"database", "redis_client"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)


@pytest.fixture(scope="session")
def settings():
    from service.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


@pytest.fixture(scope="session")
def database(settings) -> Iterator[str]:
    from service.migrate import upgrade_database

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    settings.ensure_dirs()
    upgrade_database(settings)
    yield settings.sqlalchemy_url
    from service.db import get_engine

    get_engine().dispose()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_client(settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    yield client
    client.delete(settings.queue_name)
    client.close()


def create_test_key(tenant: str, *, admin: bool = False, max_active_jobs: int | None = None) -> TestKey:
    """A real key in the test database, created exactly as `ftjobs keys create` does."""
    from service.db import transaction
    from service.tenancy.keys import Caller, create_key

    with transaction() as session:
        key, secret = create_key(session, tenant, admin=admin, max_active_jobs=max_active_jobs)
        return TestKey(secret, Caller(key_id=key.id, tenant_id=key.tenant_id, admin=key.admin))


@pytest.fixture(scope="session")
def make_key(database):
    """create_test_key(tenant, admin=False, max_active_jobs=None) -> TestKey."""
    return create_test_key


@pytest.fixture(scope="session")
def admin_key(database) -> TestKey:
    """The key the shared `api` client sends: an admin, so tests that predate tenants see every job."""
    return create_test_key("test-admins", admin=True, max_active_jobs=1000)


@pytest.fixture()
def api(database, settings, admin_key):
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app(settings), headers=admin_key.headers) as client:
        yield client


@pytest.fixture(scope="session")
def tiny_model(settings) -> Path:
    """Built under the first model root: the API reads base models nowhere else."""
    from ftjobs.tinymodel import build_tiny_model

    return build_tiny_model(settings.model_root_dirs[0] / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def data_root(settings) -> Path:
    root = Path(settings.resolved_data_root)
    root.mkdir(parents=True, exist_ok=True)
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def _uvicorn_api(**env_overrides: str) -> Iterator[tuple[str, int]]:
    """The API under uvicorn as deployed, with these FTJOBS_ settings; yields its URL and process id."""
    from harness import wait_until_serving

    port = free_port()
    env = {**os.environ, "FTJOBS_LOG_LEVEL": "WARNING", **env_overrides}
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
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/healthz", process, "the API")
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def uvicorn_api(database):
    """uvicorn_api(**FTJOBS_settings): a context manager running the API under uvicorn; yields (url, pid)."""
    return _uvicorn_api


@pytest.fixture(scope="session")
def worker(database, redis_client) -> Iterator[WorkerProcess]:
    process = WorkerProcess(f"test-{RUN_ID}@localhost")
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture()
def store_queued_job(database, settings, admin_key):
    """Store a job exactly as POST /v1/jobs does, but send no message: the test decides when (and how often)."""
    from domain.spec import JobSpec
    from service.db import transaction
    from service.jobs.service import submit_job

    def store(spec: dict) -> str:
        with transaction() as session:
            return submit_job(session, settings, JobSpec.model_validate(spec), admin_key.caller).id

    return store


@pytest.fixture()
def wait_for_status(api):
    """Poll the API until a job reaches one of `statuses`."""
    return lambda job_id, statuses, timeout_seconds=300: _wait_for_status(api, job_id, statuses, timeout_seconds)


def _wait_for_status(api, job_id: str, statuses: set[str], timeout_seconds: float) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} stayed {job['status']}; wanted {statuses}: {job}")
        time.sleep(0.3)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    """A real S3 HTTP endpoint: moto's standalone server (the one available here), with a bucket `ftjobs`.

    Credentials are moto's dummies, set in the environment, so every process the tests start can use it."""
    import boto3

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ftjobs")
            break
        except Exception:  # not listening yet
            if server.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield endpoint
    os.killpg(server.pid, 9)
    server.wait()
