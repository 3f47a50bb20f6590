"""A real deployment in miniature, for fault injection and multi-machine tests: its own Redis server, the API
as a uvicorn process and `ftjobs worker` processes, against the session's PostgreSQL database.

Every process starts in its own session (process group), so a test can SIGKILL, SIGSTOP or SIGTERM a worker
together with its training process, and the fixture ends each one by its process group, never by name. Leases,
reconcile intervals and grace periods are seconds long here, so a lost worker is noticed in seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LEASE_SECONDS = 6
# One per test session: names its database, queue, home and worker, so concurrent sessions never meet.
RUN_ID = uuid.uuid4().hex[:10]
FAST_SETTINGS = {
    "FTJOBS_LEASE_SECONDS": str(LEASE_SECONDS),
    "FTJOBS_LEASE_RENEW_SECONDS": "1",
    "FTJOBS_RECONCILE_INTERVAL_SECONDS": "1",
    "FTJOBS_REQUEUE_GRACE_SECONDS": "3",
    "FTJOBS_CANCEL_POLL_SECONDS": "0.2",
    "FTJOBS_DRAIN_SECONDS": "60",
    "FTJOBS_MAX_ATTEMPTS": "5",
    "FTJOBS_WORKER_METRICS_PORT": "0",
    # The faults hammer the API and queue many jobs at once: the per-key rate limit and the tenant quota are
    # tested elsewhere (tests/service/test_tenancy.py) and would only get in the way here.
    "FTJOBS_RATE_LIMIT_REQUESTS": "1000000",
    "FTJOBS_MAX_ACTIVE_JOBS_PER_TENANT": "100000",
}
TERMINAL = {"succeeded", "failed", "cancelled"}
PG_ADMIN_URL = os.environ.get("FTJOBS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test")


def wait_until_serving(
    url: str, process: subprocess.Popen, what: str, timeout_seconds: float = 60, output: list[str] | None = None
) -> None:
    """Poll `url` until it answers 200. Fails at once if `process` exits, else after the timeout, with the
    process's last output lines when they are captured."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "".join((output or [])[-40:])
            raise RuntimeError(f"{what} did not come up at {url} (exit code {process.poll()})\n{tail}")
        time.sleep(0.2)


# ---- in-process training runs killed at a checkpoint (tests/worker) ----
class Killed(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def kill_after(step_to_die: int):
    def on_checkpoint(step: int, path: str) -> None:
        if step == step_to_die:
            raise Killed(path)

    return on_checkpoint


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class WorkerProcess:
    """`ftjobs worker` as its own process, exactly as deployed, with its log captured for assertions."""

    def __init__(self, name: str, **env_overrides: str) -> None:
        self.name = name
        self.lines: list[str] = []
        self.metrics_port = free_port()  # its own /metrics, never the default 9101 another worker may hold
        env = {**os.environ, "FTJOBS_WORKER_METRICS_PORT": str(self.metrics_port), **env_overrides}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ftjobs.cli", "worker", "--name", name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            sys.stderr.write(f"[worker] {line}")

    def wait_ready(self, timeout_seconds: float = 120) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not any(" ready." in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + "".join(self.lines[-50:]))
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class ManagedProcess:
    """A child in its own process group, with its output captured for assertions and failure messages."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str]) -> None:
        self.label, self.argv, self.env = label, argv, env
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            sys.stderr.write(f"[{self.label}] {line}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def wait_for_line(self, text: str, timeout_seconds: float) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.label} never printed {text!r}:\n" + "".join(self.lines[-40:]))
            time.sleep(0.1)

    def end(self) -> None:
        if self.process.poll() is None:
            self.signal_group(signal.SIGCONT)  # a stopped group would never act on the kill below
            self.signal_group(signal.SIGKILL)
        self.process.wait(timeout=30)


class RedisServer:
    """A Redis of this test's own on a free port, keeping nothing on disk: a restart comes back empty."""

    def __init__(self, directory: Path) -> None:
        self.port, self.directory = free_port(), directory
        self.server: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.server = ManagedProcess(
            "redis",
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            dict(os.environ),
        )
        self.server.wait_for_line("Ready to accept connections", 30)

    def kill(self) -> None:
        self.server.end()


@dataclass
class Stack:
    """One deployment: its own database (built by the migrations), its own Redis, its API and workers.

    Each stack has a database of its own because its reconcilers act on every job they can see, as they must in
    a real deployment: sharing the test session's database would hand its jobs to this stack's workers."""

    env: dict[str, str]
    redis: RedisServer
    api_port: int
    database_url: str
    api: ManagedProcess | None = None
    workers: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import sessionmaker

        from service.tenancy.keys import create_key

        self.engine = create_engine(self.database_url, pool_size=2, max_overflow=2, pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        with self.sessions() as session, session.begin():
            _, secret = create_key(session, "stack", admin=True)
        self.headers = {"Authorization": f"Bearer {secret}"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_api(self, *args: str, **env: str) -> None:
        """`ftjobs api` with these extra arguments and settings, waited for until it is ready."""
        self.api = ManagedProcess(
            "api", [sys.executable, "-m", "ftjobs.cli", "api", "--port", str(self.api_port), *args], {**self.env, **env}
        )
        wait_until_serving(f"{self.url}/readyz", self.api.process, "the API", output=self.api.lines)

    def start_worker(self, name: str, **env: str) -> ManagedProcess:
        worker = ManagedProcess(
            name, [sys.executable, "-m", "ftjobs.cli", "worker", "--name", f"{name}@stack"], {**self.env, **env}
        )
        worker.wait_for_line(" ready.", 120)
        self.workers[name] = worker
        return worker

    def worker_of(self, hostname: str) -> ManagedProcess:
        return self.workers[hostname.split("@", 1)[0]]

    def client(self) -> httpx.Client:
        """An HTTP client of the stack's API with its admin key."""
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    def submit(self, spec: dict) -> str:
        response = httpx.post(f"{self.url}/v1/jobs", json=spec, headers=self.headers, timeout=30)
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def end(self) -> None:
        for process in [*self.workers.values(), self.api]:
            if process is not None:
                process.end()
        self.redis.kill()
        self.engine.dispose()

    # --- reading the truth: the database (the API may be the process under test) ------------------------

    def job(self, job_id: str) -> dict:
        """The job as GET /v1/jobs/{id} shows it."""
        from service.jobs.repository import get_job
        from service.schemas import JobOut

        with self.sessions() as session:
            return JobOut.of(get_job(session, job_id)).model_dump(mode="json")

    def events(self, job_id: str) -> list[dict]:
        from service.jobs.repository import list_events

        with self.sessions() as session:
            return [
                {"seq": e.seq, "kind": e.kind, "data": e.data}
                for e in list_events(session.connection(), job_id, after_seq=0, limit=100_000)
            ]

    def child_pid(self, job_id: str, number: int) -> int | None:
        from sqlalchemy import select

        from service.models import JobAttempt

        with self.sessions() as session:
            return session.scalar(
                select(JobAttempt.child_pid).where(JobAttempt.job_id == job_id, JobAttempt.number == number)
            )

    def job_ids_tagged(self, key: str, value: str) -> list[str]:
        from sqlalchemy import select

        from service.models import Job

        with self.sessions() as session:
            return list(session.scalars(select(Job.id).where(Job.spec["metadata"][key].as_string() == value)))

    def wait_for_end(self, job_id: str, timeout_seconds: float = 240) -> dict:
        return wait_until(
            lambda: (job := self.job(job_id))["status"] in TERMINAL and job, timeout_seconds, f"job {job_id} to end"
        )

    def wait_for_checkpoint(self, job_id: str, attempt: int = 1, timeout_seconds: float = 120) -> dict:
        return wait_until(
            lambda: next(
                (e for e in self.events(job_id) if e["kind"] == "checkpoint" and e["data"]["attempt"] == attempt), None
            ),
            timeout_seconds,
            f"a checkpoint of attempt {attempt} of {job_id}",
        )

    def running_attempt(self, job_id: str, number: int, timeout_seconds: float = 120) -> dict:
        def find():
            return next(
                (a for a in self.job(job_id)["attempts"] if a["number"] == number and a["outcome"] is None), None
            )

        return wait_until(find, timeout_seconds, f"attempt {number} of {job_id} to run")

    def assert_succeeded_once(self, job: dict) -> None:
        assert job["status"] == "succeeded", job["error"]
        states = [e["data"]["status"] for e in self.events(job["id"]) if e["kind"] == "state"]
        assert states.count("succeeded") == 1 and states[-1] == "succeeded", states
        assert job["attempts"][-1]["outcome"] == "succeeded"
        assert job["progress"]["step"] == job["progress"]["total_steps"]
        assert_attempts_never_overlap(job)


def job_spec(model_dir: Path, dataset: str, max_steps: int = 120) -> dict:
    """LoRA on the tiny model, a checkpoint every 5 steps: some seconds of real training on the CPU."""
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "max_steps": max_steps,
            "micro_batch_size": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-3,
            "seed": 5,
            "checkpoint_every_steps": 5,
            "keep_checkpoints": 2,
            "logging_steps": 5,
        },
        "memory": {"optimizer": "adamw", "gradient_checkpointing": False},
    }


def wait_until(predicate, timeout_seconds: float, what: str, interval_seconds: float = 0.2):
    deadline = time.monotonic() + timeout_seconds
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        time.sleep(interval_seconds)


def assert_attempts_never_overlap(job: dict) -> None:
    """Each attempt ended before the next began, by the database's clock."""
    attempts = job["attempts"]
    assert [a["number"] for a in attempts] == list(range(1, len(attempts) + 1))
    for earlier, later in zip(attempts, attempts[1:], strict=False):
        assert earlier["ended_at"] is not None and earlier["ended_at"] <= later["started_at"], (earlier, later)


class ProcessWatcher:
    """Samples, every 50 ms, which attempts of the watched jobs have a live training process that is not
    stopped, and records every moment two attempts of one job had one at once."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.jobs: set[str] = set()
        self.overlaps: list[tuple[float, str, int, int]] = []  # (monotonic time, job, attempt, attempt)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, job_id: str) -> str:
        self.jobs.add(job_id)
        return job_id

    def __enter__(self) -> ProcessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stopped.set()
        self._thread.join()

    def _run(self) -> None:
        from sqlalchemy import select

        from service.models import JobAttempt

        while not self._stopped.wait(0.05):
            try:
                with self.stack.sessions() as session:
                    rows = list(
                        session.execute(
                            select(JobAttempt.job_id, JobAttempt.number, JobAttempt.child_pid).where(
                                JobAttempt.job_id.in_(self.jobs), JobAttempt.child_pid.is_not(None)
                            )
                        )
                    )
            except Exception:  # a test that terminates database connections: sample again next tick
                continue
            live: dict[str, list[int]] = {}
            for job_id, number, pid in rows:
                if _running(pid):
                    live.setdefault(job_id, []).append(number)
            for job_id, numbers in live.items():
                if len(numbers) > 1:
                    self.overlaps.append((time.monotonic(), job_id, *sorted(numbers)[:2]))


def _running(pid: int) -> bool:
    """Alive and not stopped (SIGSTOP) or a zombie: /proc/PID/stat's state field."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X")


@contextmanager
def running_stack(directory: Path, **env: str) -> Iterator[Stack]:
    """A fresh database and Redis, no processes yet; every process it starts is ended when the block exits."""
    import psycopg

    from service.migrate import upgrade_database
    from service.settings import Settings

    name = f"ftjobs_stack_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade_database(Settings(database_url=database_url))
    redis = RedisServer(directory)
    redis.start()
    stack = Stack(
        {
            **os.environ,
            **FAST_SETTINGS,
            "FTJOBS_REDIS_URL": redis.url,
            "FTJOBS_DATABASE_URL": database_url,
            "FTJOBS_QUEUE_NAME": f"stack-{uuid.uuid4().hex[:8]}",
            **env,
        },
        redis,
        free_port(),
        database_url.replace("postgresql://", "postgresql+psycopg://", 1),
    )
    try:
        yield stack
    finally:
        stack.end()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class TestKey:
    """An API key made for a test: the secret to send, and the caller it authenticates as."""

    def __init__(self, secret: str, caller) -> None:
        self.secret, self.caller = secret, caller

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}
