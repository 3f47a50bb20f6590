"""API load benchmark: the ftjobs API and a minimal reference app (benchmarks/reference_api.py) side by side,
on the same database, under wrk, interleaved, several rounds; at 10,000 and then 100,000 jobs.

The deployment is tests/harness.py's (its own PostgreSQL database built by the migrations, its own Redis, the
API as `ftjobs api`). Both servers are pinned to CPU 0 and wrk to CPU 1; PostgreSQL is not pinned. Each row is
the median over the rounds; the spread is the API's throughput range across rounds. CPU per request is the
server process's (and PostgreSQL's, all backends) user + system time over the run, divided by its requests.

    .venv/bin/python benchmarks/api_load.py --rounds 3 --seconds 5 --out benchmarks/results/api-load-cpu-2core.jsonl

Needs wrk (Debian: `apt-get install wrk`) and two CPUs. docs/performance.md keeps the table and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVER_CPU, WRK_CPU = 0, 1
TENANTS = 10  # jobs are spread over this many tenants; the benchmark reads as the first, writes as its own
BIG_JOB_EVENTS = 10_000
LARGE_DATASET_ROWS = 1_000_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# wrk reports through this script: a JSON line with requests, errors and latency percentiles.
WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRK {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\\n', summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="each wrk run")
    parser.add_argument("--sizes", default="10000,100000", help="job counts, seeded in this order")
    parser.add_argument(
        "--api-env",
        action="append",
        default=[],
        metavar="FTJOBS_X=VALUE",
        help="a setting for the API process (repeatable), e.g. FTJOBS_API_THREADS=8",
    )
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--out", type=Path, help="append one JSON row per scenario and size")
    return parser.parse_args()


@dataclass
class Scenario:
    name: str
    concurrency: int
    api_path: str
    reference_path: str
    body: str | None = None  # a POST's JSON body

    def script(self, key: str | None) -> str:
        lines = [WRK_REPORT]
        if key:
            lines.append(f'wrk.headers["Authorization"] = "Bearer {key}"')
        if self.body is not None:
            lines += [
                'wrk.method = "POST"',
                'wrk.headers["Content-Type"] = "application/json"',
                f"wrk.body = [==[{self.body}]==]",
            ]
        return "\n".join(lines)


@dataclass
class Run:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu_ms: float  # per request
    postgres_cpu_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a backend that exited during the run; its time is lost to both sides alike
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def run_wrk(url: str, scenario: Scenario, key: str | None, seconds: float, server_pid: int, script_dir: Path) -> Run:
    script = script_dir / f"{scenario.name}-{'api' if key else 'ref'}.lua"
    script.write_text(scenario.script(key))
    pg_pids = postgres_pids()
    server_before, pg_before = cpu_seconds([server_pid]), cpu_seconds(pg_pids)
    output = subprocess.run(
        [
            "taskset",
            "-c",
            str(WRK_CPU),
            "wrk",
            "-t1",
            f"-c{scenario.concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    server_cpu, pg_cpu = cpu_seconds([server_pid]) - server_before, cpu_seconds(pg_pids) - pg_before
    report = json.loads(next(line for line in output.splitlines() if line.startswith("WRK "))[4:])
    requests = max(report["requests"], 1)
    errors = sum(report[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Run(
        report["requests"],
        report["duration_us"] / 1e6,
        report["p50_us"] / 1000,
        report["p99_us"] / 1000,
        errors,
        1000 * server_cpu / requests,
        1000 * pg_cpu / requests,
    )


# --- the deployment and its data -----------------------------------------------------------------------------


def prepare_environment(home: Path) -> None:
    os.environ.update({"FTJOBS_HOME": str(home), "FTJOBS_LOG_LEVEL": "WARNING"})
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))


def write_datasets(data_root: Path) -> None:
    data_root.mkdir(parents=True, exist_ok=True)
    row = '{"instruction": "Spell %d backwards.", "output": "%s"}\n'
    (data_root / "small.jsonl").write_text("".join(row % (i, str(i)[::-1]) for i in range(10)))
    with open(data_root / "large.jsonl", "w") as large:
        large.writelines(row % (i, str(i)[::-1]) for i in range(LARGE_DATASET_ROWS))


def job_spec(model: Path, dataset: str) -> dict:
    return {
        "base_model": str(model),
        "dataset": {"path": dataset},
        "method": "lora",
        "lora": {"r": 8},
        "training": {"max_steps": 100, "micro_batch_size": 2, "max_seq_length": 256},
        "resources": {"gpu_memory_gib": 80},
    }


def make_keys(stack) -> dict[str, tuple[str, str]]:
    """tenant name -> (tenant id, key): the readers' tenants and the writers' own."""
    from service.tenancy.keys import create_key

    keys = {}
    with stack.sessions() as session, session.begin():
        for name in [*(f"bench-{i}" for i in range(TENANTS)), "bench-writes"]:
            key, secret = create_key(session, name, max_active_jobs=10**9)
            keys[name] = (key.tenant_id, secret)
    return keys


def seed(stack, template_id: str, tenant_ids: list[str], first: int, last: int) -> None:
    """Jobs first..last cloned from a real submission, spread over the tenants and states, each with two state
    changes and two progress events and, once started, one attempt."""
    from sqlalchemy import text

    params = {"template": template_id, "first": first, "last": last, "tenants": tenant_ids}
    with stack.engine.begin() as connection:
        floor = connection.execute(text("SELECT coalesce(max(seq), 0) FROM jobs")).scalar_one()
        connection.execute(
            text("""
            INSERT INTO jobs (id, status, tenant_id, spec, plan, base_model_path, dataset_url, predicted_peak_bytes,
                              progress, attempt, queued_at, created_at, updated_at, started_at, finished_at)
            SELECT 'job_' || substr(md5('seed' || g), 1, 24),
                   (ARRAY['succeeded','succeeded','succeeded','failed','cancelled','running','queued'])[1 + g % 7],
                   (CAST(:tenants AS text[]))[1 + g % cardinality(CAST(:tenants AS text[]))],
                   t.spec, t.plan, t.base_model_path, t.dataset_url, t.predicted_peak_bytes,
                   '{"step": 100, "total_steps": 100, "loss": 1.25}', 1, now(), now(), now(), now(), now()
            FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g,
                 (SELECT * FROM jobs WHERE id = :template) AS t
            ORDER BY g"""),
            params,
        )
        connection.execute(
            text("""
            INSERT INTO job_events (job_id, kind, data, created_at)
            SELECT j.id, e.kind, CAST(e.data AS jsonb), now()
            FROM jobs AS j, (VALUES (1, 'state', '{"status": "queued"}'), (2, 'state', '{"status": "running"}'),
                                    (3, 'progress', '{"step": 50, "loss": 1.5}'),
                                    (4, 'progress', '{"step": 100, "loss": 1.25}')) AS e(n, kind, data)
            WHERE j.seq > :floor ORDER BY j.seq, e.n"""),
            {"floor": floor},
        )
        connection.execute(
            text("""
            INSERT INTO job_attempts (job_id, number, worker_hostname, started_at, ended_at, outcome)
            SELECT id, 1, 'bench@worker', now(), now(), 'succeeded' FROM jobs
            WHERE seq > :floor AND status <> 'queued'"""),
            {"floor": floor},
        )
    with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE"))


def add_big_job(stack, template_id: str, tenant_id: str) -> str:
    """A job with BIG_JOB_EVENTS progress events, the newest events in the table, as a long running job has."""
    from sqlalchemy import text

    with stack.engine.begin() as connection:
        job_id = connection.execute(
            text("""
            INSERT INTO jobs (id, status, tenant_id, spec, plan, base_model_path, dataset_url, predicted_peak_bytes,
                              attempt, created_at, updated_at)
            SELECT 'job_' || substr(md5('big' || now()), 1, 24), 'running', :tenant, spec, plan, base_model_path,
                   dataset_url, predicted_peak_bytes, 1, now(), now() FROM jobs WHERE id = :template
            RETURNING id"""),
            {"tenant": tenant_id, "template": template_id},
        ).scalar_one()
        connection.execute(
            text("""
            INSERT INTO job_events (job_id, kind, data, created_at)
            SELECT :job, 'progress', jsonb_build_object('step', g, 'loss', 2.0 - g / 10000.0), now()
            FROM generate_series(1, CAST(:events AS integer)) AS g ORDER BY g"""),
            {"job": job_id, "events": BIG_JOB_EVENTS},
        )
    with stack.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("ANALYZE job_events"))  # as autovacuum would soon after such a burst
    return job_id


def explain_events(stack, job_id: str) -> dict:
    """EXPLAIN ANALYZE of the events page as the repository writes it (service/jobs/repository.py
    `_EVENTS_PAGE`), and of the plain form it replaced."""
    from sqlalchemy import text

    keyset = (
        "SELECT * FROM job_events WHERE (job_id, seq) > (:id, 0) AND (job_id, seq) <= (:id, 9223372036854775807) "
        "ORDER BY job_id, seq LIMIT 100"
    )
    plain = "SELECT * FROM job_events WHERE job_id = :id AND seq > 0 ORDER BY seq LIMIT 100"
    result = {}
    with stack.engine.connect() as connection:
        for name, sql in (("keyset", keyset), ("plain", plain)):
            lines = [row[0] for row in connection.execute(text(f"EXPLAIN (ANALYZE, BUFFERS) {sql}"), {"id": job_id})]
            result[name] = lines
    return result


# --- the two servers -----------------------------------------------------------------------------------------


def start_reference(stack, port: int, model: Path, tenant_id: str):
    from harness import ManagedProcess

    env = {
        **stack.env,
        "BENCH_DATABASE_URL": stack.database_url,
        "BENCH_MODEL_DIR": str(model),
        "BENCH_TENANT_ID": tenant_id,
        "PYTHONPATH": str(REPO),
    }
    server = ManagedProcess(
        "reference",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.reference_api:app",
            "--port",
            str(port),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env,
    )
    from harness import wait_until_serving

    wait_until_serving(f"http://127.0.0.1:{port}/docs", server.process, "the reference", output=server.lines)
    return server


def scenarios(stack, keys, job_id: str, big_job: str, model: Path) -> list[Scenario]:
    from sqlalchemy import text

    reader_tenant = keys["bench-0"][0]
    with stack.engine.connect() as connection:
        # The anchor of a deep page: the tenant's 90%-deep job, as a client paging through its history reaches.
        count = connection.execute(text("SELECT count(*) FROM jobs WHERE tenant_id = :t"), {"t": reader_tenant})
        deep = connection.execute(
            text("SELECT id, seq FROM jobs WHERE tenant_id = :t ORDER BY seq DESC OFFSET :n LIMIT 1"),
            {"t": reader_tenant, "n": int(count.scalar_one() * 0.9)},
        ).one()
    small, large = (json.dumps(job_spec(model, name)) for name in ("small.jsonl", "large.jsonl"))
    get = (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}")
    return [
        Scenario("get_job", 16, *get),
        Scenario("get_job", 64, *get),
        Scenario("get_job", 256, *get),
        Scenario("list_first_page", 16, "/v1/jobs?limit=50", f"/v1/jobs?tenant_id={reader_tenant}&limit=50"),
        Scenario(
            "list_deep_page",
            16,
            f"/v1/jobs?limit=50&after={deep.id}",
            f"/v1/jobs?tenant_id={reader_tenant}&before_seq={deep.seq}&limit=50",
        ),
        Scenario("events_first_page", 1, f"/v1/jobs/{big_job}/events", f"/v1/jobs/{big_job}/events"),
        Scenario("events_first_page", 16, f"/v1/jobs/{big_job}/events", f"/v1/jobs/{big_job}/events"),
        Scenario("plan", 16, "/v1/plans", "/v1/plans", small),
        Scenario("submit_10_rows", 16, "/v1/jobs", "/v1/jobs", small),
        Scenario("submit_1e6_rows", 16, "/v1/jobs", "/v1/jobs", large),
    ]


def measure(stack, servers: dict, keys, cases: list[Scenario], args, script_dir: Path) -> list[dict]:
    """Every scenario on both servers, `rounds` times, alternating which goes first."""
    results: dict[tuple[str, int], dict[str, list[Run]]] = {}
    for round_number in range(args.rounds):
        for case in cases:
            order = ["api", "reference"] if round_number % 2 == 0 else ["reference", "api"]
            for side in order:
                url, pid = servers[side]
                key = keys["bench-writes" if case.body else "bench-0"][1] if side == "api" else None
                path = case.api_path if side == "api" else case.reference_path
                if round_number == 0:  # warm both: connections in the pool, code paths, caches
                    run_wrk(url + path, case, key, 1, pid, script_dir)
                run = run_wrk(url + path, case, key, args.seconds, pid, script_dir)
                results.setdefault((case.name, case.concurrency), {}).setdefault(side, []).append(run)
                print(
                    f"  round {round_number + 1} {case.name} c{case.concurrency} {side}: {run.rps:.0f} req/s "
                    f"p99 {run.p99_ms:.1f} ms errors {run.errors}",
                    file=sys.stderr,
                )
    return [summarize(name, concurrency, runs) for (name, concurrency), runs in results.items()]


def summarize(name: str, concurrency: int, runs: dict[str, list[Run]]) -> dict:
    def median(side: str, attr: str) -> float:
        return statistics.median(getattr(run, attr) for run in runs[side])

    api_rps = [run.rps for run in runs["api"]]
    row = {
        "scenario": name,
        "concurrency": concurrency,
        "rounds": len(api_rps),
        "api_rps": median("api", "rps"),
        "ref_rps": median("reference", "rps"),
        "api_p50_ms": median("api", "p50_ms"),
        "api_p99_ms": median("api", "p99_ms"),
        "ref_p50_ms": median("reference", "p50_ms"),
        "ref_p99_ms": median("reference", "p99_ms"),
        "api_errors": sum(run.errors for run in runs["api"]),
        "ref_errors": sum(run.errors for run in runs["reference"]),
        "api_cpu_ms": median("api", "server_cpu_ms"),
        "ref_cpu_ms": median("reference", "server_cpu_ms"),
        "api_pg_cpu_ms": median("api", "postgres_cpu_ms"),
        "ref_pg_cpu_ms": median("reference", "postgres_cpu_ms"),
        "api_rps_spread": (max(api_rps) - min(api_rps)) / statistics.median(api_rps),
    }
    row["rps_ratio"] = row["api_rps"] / row["ref_rps"] if row["ref_rps"] else float("inf")
    row["p99_ratio"] = row["api_p99_ms"] / row["ref_p99_ms"] if row["ref_p99_ms"] else float("inf")
    return row


def print_table(size: int, rows: list[dict]) -> None:
    print(f"\n{size:,} jobs")
    print(
        "| scenario | c | API req/s | ref req/s | ratio | API p50 ms | API p99 ms | ref p99 ms | p99 ratio | "
        "errors API/ref | API CPU ms/req | ref CPU ms/req | PG CPU ms/req API/ref | API spread |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['scenario']} | {r['concurrency']} | {r['api_rps']:.0f} | {r['ref_rps']:.0f} | "
            f"{r['rps_ratio']:.2f}× | {r['api_p50_ms']:.1f} | {r['api_p99_ms']:.1f} | {r['ref_p99_ms']:.1f} | "
            f"{r['p99_ratio']:.2f}× | {r['api_errors']}/{r['ref_errors']} | {r['api_cpu_ms']:.2f} | "
            f"{r['ref_cpu_ms']:.2f} | {r['api_pg_cpu_ms']:.2f}/{r['ref_pg_cpu_ms']:.2f} | "
            f"±{50 * r['api_rps_spread']:.0f}% |"
        )


def events_histogram(api_url: str) -> tuple[float, float]:
    """The API's own duration histogram of the events route: (requests within 5 ms, requests in all)."""
    import httpx

    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    route = 'route="/v1/jobs/{job_id}/events"'
    within = total = 0.0
    for line in text.splitlines():
        if line.startswith("ftjobs_http_request_duration_seconds_bucket") and route in line:
            if 'le="0.005"' in line:
                within = float(line.rsplit(" ", 1)[1])
            if 'le="+Inf"' in line:
                total = float(line.rsplit(" ", 1)[1])
    return within, total


def events_server_side(api_url: str, key: str, big_job: str, seconds: int) -> str:
    """One request at a time, so the API's histogram holds service time alone, with no queueing in it."""
    case = Scenario("events_server_side", 1, f"/v1/jobs/{big_job}/events", "")
    within_before, total_before = events_histogram(api_url)
    run = run_wrk(api_url + case.api_path, case, key, seconds, os.getpid(), Path(tempfile.gettempdir()))
    within, total = events_histogram(api_url)
    share = (within - within_before) / max(total - total_before, 1)
    return (
        f"events first page of a {BIG_JOB_EVENTS:,}-event job, one request at a time: {100 * share:.1f}% of "
        f"{total - total_before:.0f} requests served within 5 ms by the API's own histogram; client p50 "
        f"{run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms"
    )


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="ftjobs-load-") as tmp:
        home = Path(tmp)
        prepare_environment(home)
        os.sched_setaffinity(0, {SERVER_CPU})  # the servers this process starts inherit it; wrk is pinned apart
        from harness import free_port, running_stack

        from ftjobs.tinymodel import build_tiny_model
        from service.settings import Settings

        model = build_tiny_model(home / "models" / "tiny-llama", arch="llama", seed=0)
        write_datasets(Path(Settings().resolved_data_root))
        with running_stack(
            home, FTJOBS_RATE_LIMIT_REQUESTS=str(10**9), FTJOBS_MAX_ACTIVE_JOBS_PER_TENANT=str(10**9)
        ) as stack:
            stack.start_api(**dict(setting.split("=", 1) for setting in args.api_env))
            keys = make_keys(stack)
            headers = {"Authorization": f"Bearer {keys['bench-0'][1]}"}
            import httpx

            template = httpx.post(
                f"{stack.url}/v1/jobs", json=job_spec(model, "small.jsonl"), headers=headers, timeout=60
            ).json()["id"]
            # The large dataset's one validation, before anything is timed.
            started = time.monotonic()
            httpx.post(
                f"{stack.url}/v1/jobs",
                json=job_spec(model, "large.jsonl"),
                headers={"Authorization": f"Bearer {keys['bench-writes'][1]}"},
                timeout=600,
            ).raise_for_status()
            print(
                f"first submission of the {LARGE_DATASET_ROWS:,}-row dataset (validates it): "
                f"{time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
            reference_port = free_port()
            reference = start_reference(stack, reference_port, model, keys["bench-writes"][0])
            try:
                servers = {
                    "api": (stack.url, stack.api.pid),
                    "reference": (f"http://127.0.0.1:{reference_port}", reference.pid),
                }
                tenant_ids = [keys[f"bench-{i}"][0] for i in range(TENANTS)]
                seeded, big_job = 1, None
                for size in (int(s) for s in args.sizes.split(",")):
                    seed(stack, template, tenant_ids, seeded, size)
                    seeded = size + 1
                    big_job = big_job or add_big_job(stack, template, keys["bench-0"][0])
                    cases = [
                        case
                        for case in scenarios(stack, keys, template, big_job, model)
                        if not args.only or case.name in args.only.split(",")
                    ]
                    rows = measure(stack, servers, keys, cases, args, home)
                    print_table(size, rows)
                    print("\n" + events_server_side(stack.url, keys["bench-0"][1], big_job, args.seconds))
                    plans = explain_events(stack, big_job)
                    for name, lines in plans.items():
                        print(f"\nEXPLAIN ANALYZE, {name} form, {size:,} jobs:\n    " + "\n    ".join(lines))
                    if args.out:
                        with args.out.open("a") as out:
                            for row in rows:
                                out.write(json.dumps({**row, "jobs": size, "machine": machine()}) + "\n")
            finally:
                reference.end()
    return 0


def machine() -> dict:
    import fastapi
    import sqlalchemy
    import uvicorn

    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "fastapi": fastapi.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "uvicorn": uvicorn.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    sys.exit(main())
