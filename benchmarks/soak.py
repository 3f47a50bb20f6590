"""Soak benchmark: random faults injected into many jobs on a miniature deployment, then a count of
every job that was lost or ran twice.

The deployment is tests/harness.py's (its own PostgreSQL database built by the migrations, its own Redis, the
API and `ftjobs worker` processes, each in its own process group). The script, not pytest, drives it, so it can
run for many minutes with a hard deadline. Process output goes to stderr; the table goes to stdout.

    .venv/bin/python benchmarks/soak.py --jobs 50 --faults 200 --workers 3 --deadline-minutes 25 2>soak.log
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A retry budget no random run of faults can use up: a job failed for exhausted attempts would hide whether
# the system lost it.
MAX_ATTEMPTS = 100
SETTLE_SECONDS_MIN = 120  # of the deadline, kept for the jobs to end after the last fault
DRAIN_WAIT_SECONDS = 90  # FTJOBS_DRAIN_SECONDS (60 in the harness) plus the worker's shutdown
# A training process takes some seconds to import torch before its first step, so a fault on a worker waits this
# long for an attempt that has stored a checkpoint, which makes the resume path the one exercised.
TARGET_WAIT_SECONDS = 20
KINDS = (
    "worker_killed",
    "training_killed",
    "redis_restarted",
    "api_killed",
    "db_connections_terminated",
    "worker_paused",
    "worker_drained",
)
TARGETED = {"worker_killed", "training_killed", "worker_paused", "worker_drained"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--workers", type=int, default=3, help="worker processes alive at once")
    parser.add_argument("--deadline-minutes", type=float, default=25, help="hard bound on the whole run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append the result row to this file as JSON")
    return parser.parse_args()


def prepare_environment(home: Path) -> None:
    """What tests/conftest.py sets, before any ftjobs module reads its settings."""
    os.environ.update({"FTJOBS_HOME": str(home), "FTJOBS_LOG_LEVEL": "INFO", "FTJOBS_CANCEL_POLL_SECONDS": "0.2"})
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))


def prepare_inputs(home: Path) -> tuple[Path, str]:
    """The tiny model and the fault suite's dataset: (model directory, dataset path under the data root)."""
    from ftjobs.tinymodel import build_tiny_model
    from service.settings import Settings

    model = build_tiny_model(home / "models" / "tiny-llama", arch="llama", seed=0)
    data_root = Path(Settings().resolved_data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Spell {i} backwards.", "output": str(i)[::-1] * 3} for i in range(40)]
    (data_root / "soak.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return model, "soak.jsonl"


class Soak:
    """The deployment under faults: keeps `workers` workers alive, submits jobs, injects one fault at a time."""

    def __init__(self, stack, args: argparse.Namespace, model: Path, dataset: str) -> None:
        self.stack, self.args, self.model, self.dataset = stack, args, model, dataset
        self.rng = random.Random(args.seed)
        self.faults: Counter[str] = Counter()
        self.worker_serial = 0

    # --- capacity ---------------------------------------------------------------------------------------

    def start_worker(self) -> None:
        self.worker_serial += 1
        self.stack.start_worker(f"w{self.worker_serial}")

    def replace_worker(self, name: str) -> None:
        """A lost or drained machine is replaced by a fresh one under a new name, as an autoscaler would."""
        self.stack.workers.pop(name).end()
        self.start_worker()

    # --- jobs -------------------------------------------------------------------------------------------

    def spec(self) -> dict:
        from harness import job_spec

        # 20-40 steps with a checkpoint every 5: long enough to be hit mid-training, short enough that 50
        # jobs finish on two cores.
        return {
            **job_spec(self.model, self.dataset, max_steps=self.rng.randrange(20, 41, 5)),
            "metadata": {"soak": "1"},
        }

    def post(self) -> int | str:
        """One submission: its status code, or the name of the transport error (the API may be dying)."""
        import httpx

        try:
            return httpx.post(
                f"{self.stack.url}/v1/jobs", json=self.spec(), headers=self.stack.headers, timeout=30
            ).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    def job_ids(self) -> list[str]:
        """Every stored job, answered or not: a row the API committed before it died must run too."""
        return read_retrying(lambda: self.stack.job_ids_tagged("soak", "1"))

    def unfinished(self) -> list[str]:
        from harness import TERMINAL

        return [j for j in self.job_ids() if read_retrying(lambda j=j: self.stack.job(j))["status"] not in TERMINAL]

    def top_up(self) -> None:
        """Admit jobs in step with the faults injected, so they spread over all jobs instead of falling on an
        idle deployment once the first jobs are done; keep a little more work in flight than workers."""
        injected = sum(self.faults.values())
        admitted = min(self.args.jobs, -(-self.args.jobs * (injected + 1) // self.args.faults))
        missing = admitted - len(self.job_ids())
        wanted = self.args.workers + 1 - len(self.unfinished())
        for _ in range(max(0, min(missing, wanted))):
            self.post()

    # --- faults -----------------------------------------------------------------------------------------

    def running_attempts(self, checkpointed: bool) -> list[tuple[str, int, str, int]]:
        """(job, attempt, worker name, training pid) of attempts running on a worker still in the stack; with
        `checkpointed`, only those that have stored a checkpoint of their own."""
        from sqlalchemy import select

        from service.models import JobAttempt, JobCheckpoint

        query = select(JobAttempt.job_id, JobAttempt.number, JobAttempt.worker_hostname, JobAttempt.child_pid).where(
            JobAttempt.outcome.is_(None), JobAttempt.child_pid.is_not(None)
        )
        if checkpointed:
            query = query.where(
                select(JobCheckpoint.step)
                .where(JobCheckpoint.job_id == JobAttempt.job_id, JobCheckpoint.attempt == JobAttempt.number)
                .exists()
            )

        def read():
            with self.stack.sessions() as session:
                return list(session.execute(query))

        return [
            (job, number, host.split("@", 1)[0], pid)
            for job, number, host, pid in read_retrying(read)
            if host.split("@", 1)[0] in self.stack.workers
        ]

    def find_target(self) -> tuple[str, int, str, int] | None:
        """A checkpointed running attempt if one appears in time, else any running attempt, else none."""
        deadline = time.monotonic() + TARGET_WAIT_SECONDS
        while time.monotonic() < deadline:
            if targets := self.running_attempts(checkpointed=True):
                return self.rng.choice(targets)
            time.sleep(0.2)
        targets = self.running_attempts(checkpointed=False)
        return self.rng.choice(targets) if targets else None

    def inject(self) -> None:
        """One fault of a random kind; a fault on a worker with no running attempt becomes one elsewhere."""
        kind = self.rng.choice(KINDS)
        target = self.find_target() if kind in TARGETED else None
        if target:
            getattr(self, kind)(*target)
        else:
            kind = kind if kind not in TARGETED else self.rng.choice([k for k in KINDS if k not in TARGETED])
            getattr(self, kind)()
        self.faults[kind] += 1

    def worker_killed(self, _job, _attempt, worker: str, _pid) -> None:
        self.stack.workers[worker].signal_group(signal.SIGKILL)  # the worker and its training process
        self.replace_worker(worker)

    def training_killed(self, _job, _attempt, _worker, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def redis_restarted(self) -> None:
        self.stack.redis.kill()
        time.sleep(1)
        self.stack.redis.start()  # empty: every queued message is gone

    def api_killed(self) -> None:
        """SIGKILL the API while a burst of submissions is in flight, when jobs are still to be submitted."""
        burst = min(4, self.args.jobs - len(self.job_ids()))
        with ThreadPoolExecutor(max_workers=max(1, burst)) as pool:
            for _ in range(burst):
                pool.submit(self.post)
            time.sleep(self.rng.uniform(0.05, 0.5))
            self.stack.api.signal_group(signal.SIGKILL)
        self.stack.api.end()
        self.stack.start_api()

    def db_connections_terminated(self) -> None:
        import psycopg
        from harness import PG_ADMIN_URL

        database = self.stack.database_url.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            )

    def worker_paused(self, _job, _attempt, worker: str, _pid) -> None:
        from harness import LEASE_SECONDS

        paused = self.stack.workers[worker]
        paused.signal_group(signal.SIGSTOP)
        time.sleep(LEASE_SECONDS + 3)  # past the lease: the reconciler hands the job to another worker
        paused.signal_group(signal.SIGCONT)

    def worker_drained(self, _job, _attempt, worker: str, _pid) -> None:
        draining = self.stack.workers[worker]
        draining.process.send_signal(signal.SIGTERM)  # the main process only, as `docker stop` does
        try:
            draining.process.wait(timeout=DRAIN_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"soak: {worker} did not drain within {DRAIN_WAIT_SECONDS} s", file=sys.stderr)
        self.replace_worker(worker)

    # --- the run ----------------------------------------------------------------------------------------

    def run(self, deadline: float) -> None:
        """Faults until there are enough or the injection window closes, then let every job end."""
        inject_until = deadline - max(SETTLE_SECONDS_MIN, (deadline - time.monotonic()) / 5)
        while sum(self.faults.values()) < self.args.faults and time.monotonic() < inject_until:
            self.top_up()
            self.inject()
            time.sleep(self.rng.uniform(1, 3))  # let the deployment notice one fault before the next
        while len(self.job_ids()) < self.args.jobs and time.monotonic() < deadline:
            self.post()
        while self.unfinished() and time.monotonic() < deadline:
            time.sleep(1)


def read_retrying(read, attempts: int = 10):
    """A read of the database, again after a terminated connection (a fault this script injects itself)."""
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts):
        try:
            return read()
        except DBAPIError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)


def judge(stack, job_ids: list[str]) -> dict:
    """Counts of jobs succeeded, lost (not succeeded), duplicated, and resumed from a checkpoint."""
    from harness import assert_attempts_never_overlap

    counts = Counter()
    for job_id in job_ids:
        job = read_retrying(lambda job_id=job_id: stack.job(job_id))
        states = [
            e["data"]["status"]
            for e in read_retrying(lambda job_id=job_id: stack.events(job_id))
            if e["kind"] == "state"
        ]
        try:
            assert_attempts_never_overlap(job)
            overlapping = False
        except AssertionError:
            overlapping = job["status"] == "succeeded" or len(job["attempts"]) > 1
        counts["succeeded"] += job["status"] == "succeeded"
        counts["lost"] += job["status"] != "succeeded"
        counts["duplicated"] += states.count("succeeded") > 1 or overlapping
        counts["resumed"] += any((a["resumed_from_step"] or 0) > 0 for a in job["attempts"])
        counts["attempts"] += len(job["attempts"])
        if job["status"] != "succeeded":
            print(f"soak: job {job_id} ended {job['status']}: {job.get('error')}", file=sys.stderr)
    return {"jobs": len(job_ids), **{k: counts[k] for k in ("succeeded", "lost", "duplicated", "resumed", "attempts")}}


def machine() -> dict:
    import torch

    memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "nproc": os.cpu_count(),
        "memory_gib": round(memory_bytes / 2**30, 1),
    }


def print_table(row: dict) -> None:
    lines = [("faults: " + kind, row["faults"].get(kind, 0)) for kind in KINDS]
    lines += [
        ("faults in all", sum(row["faults"].values())),
        ("jobs", row["jobs"]),
        ("succeeded", row["succeeded"]),
        ("lost", row["lost"]),
        ("duplicated", row["duplicated"]),
        ("resumed from a checkpoint", row["resumed"]),
        ("attempts in all", row["attempts"]),
        ("wall time (s)", row["wall_seconds"]),
    ]
    lines += [(key, row["machine"][key]) for key in ("python", "torch", "nproc", "memory_gib")]
    width = max(len(label) for label, _ in lines)
    print(f"{'measure':<{width}}  value")
    for label, value in lines:
        print(f"{label:<{width}}  {value}")


def raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt  # so SIGTERM, like Ctrl-C, unwinds through running_stack and ends every process


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, raise_interrupt)
    started = time.monotonic()
    deadline = started + args.deadline_minutes * 60
    with tempfile.TemporaryDirectory(prefix="ftjobs-soak-") as home:
        prepare_environment(Path(home))
        from harness import running_stack

        model, dataset = prepare_inputs(Path(home))
        with running_stack(Path(home), FTJOBS_MAX_ATTEMPTS=str(MAX_ATTEMPTS)) as stack:
            stack.start_api()
            soak = Soak(stack, args, model, dataset)
            for _ in range(args.workers):
                soak.start_worker()
            soak.run(deadline)
            row = {
                **judge(stack, soak.job_ids()),
                "faults": dict(soak.faults),
                "seed": args.seed,
                "wall_seconds": round(time.monotonic() - started, 1),
                "machine": machine(),
            }
    print_table(row)
    if args.out:
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
    return 1 if row["lost"] or row["duplicated"] else 0


if __name__ == "__main__":
    sys.exit(main())
