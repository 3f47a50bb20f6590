"""The `ftjobs` command: run the service (up, api, worker, db upgrade, keys) and use it (plan, submit, status,
jobs, files, demo). The commands that use it talk to the API through ftjobs.client (ftjobs/commands/)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from service.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (a job succeeded); 1 a job failed or was cancelled; 2 bad input (arguments, a spec file,
    a 4xx answer); 3 the server cannot be reached or could not answer (5xx). Every error is one line on stderr."""
    from ftjobs.client import ApiError, ServerUnreachable
    from ftjobs.commands.common import BAD_INPUT, UNREACHABLE, report_error
    from ftjobs.commands.jobs import SpecFileError

    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ApiError as exc:
        report_error(args, exc.problem if "code" in exc.problem else {**exc.problem, "code": exc.code})
        return UNREACHABLE if exc.status >= 500 else BAD_INPUT
    except ServerUnreachable as exc:
        report_error(args, {"code": "server_unreachable", "detail": str(exc)})
        return UNREACHABLE
    except SpecFileError as exc:
        report_error(args, {"code": "invalid_spec", "detail": str(exc)})
        return BAD_INPUT
    except OSError as exc:  # a file named on the command line: missing, unreadable, or its target unwritable
        report_error(args, {"code": "file_error", "detail": f"{exc.filename or ''}: {exc.strerror or exc}"})
        return BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    from ftjobs.commands import files, jobs, sweeps
    from ftjobs.commands.common import connection_options, json_option

    settings = get_settings()
    parser = argparse.ArgumentParser(
        prog="ftjobs",
        description=__doc__,
        epilog="exit codes: 0 done or succeeded, 1 job failed or cancelled, 2 bad input, 3 server unreachable",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="run the API and an embedded worker on this machine")
    _host_port(up, settings)
    # One API process: the embedded SQLite database and broker are for one machine's light use, and _up's
    # SIGTERM handling relies on uvicorn serving in this very process.
    up.set_defaults(run=_up, workers=1)
    api = commands.add_parser("api", help="run the API server")
    _host_port(api, settings)
    api.add_argument(
        "--workers",
        type=_process_count,
        default=settings.api_workers,
        help="API processes (default: FTJOBS_API_WORKERS, else WEB_CONCURRENCY, else 1)",
    )
    api.set_defaults(run=_api)
    worker = commands.add_parser("worker", help="run a training worker")
    worker.add_argument("--name", default=None, help="Celery node name (default: celery@HOSTNAME)")
    worker.set_defaults(run=_worker)
    db = commands.add_parser("db", help="database maintenance")
    db.add_argument("action", choices=["upgrade"], help="upgrade: run the migrations up to the latest revision")
    json_option(db)
    db.set_defaults(run=_db)
    _keys_parser(commands)

    plan = commands.add_parser("plan", help="print the memory plan of a spec as JSON (no server needed)")
    plan.add_argument("spec", type=Path, help="the job spec, a JSON file")
    json_option(plan)
    plan.set_defaults(run=_plan)
    connection = connection_options()
    jobs.register(commands, connection)
    files.register(commands, connection)
    sweeps.register(commands, connection)
    demo = commands.add_parser("demo", help="train a QLoRA adapter on a tiny local model, end to end")
    demo.add_argument("--url", default=None, help="use a running service instead of starting one")
    _api_key(demo)
    demo.set_defaults(run=_demo)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ftjobs")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _keys_parser(commands) -> None:
    from ftjobs.commands.common import json_option

    keys = commands.add_parser("keys", help="API keys, straight in the database (as `db upgrade`)")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a key; the key itself is the last line printed")
    create.add_argument("--tenant", required=True, help="the tenant's name; created on first use")
    create.add_argument("--admin", action="store_true", help="the key acts across every tenant")
    create.add_argument("--max-active-jobs", type=int, default=None, help="the tenant's active-jobs quota")
    create.add_argument(
        "--webhook-url",
        default=None,
        help="POST the tenant's job state changes and checkpoints here (Standard Webhooks); "
        "prints the tenant's signing secret",
    )
    create.set_defaults(run=_keys_create)
    listing = actions.add_parser("list", help="every key: id, tenant, admin, created, revoked")
    listing.set_defaults(run=_keys_list)
    revoke = actions.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("key_id", help="the key's id, as `keys list` prints it")
    revoke.set_defaults(run=_keys_revoke)
    for action in (create, listing, revoke):
        json_option(action)


def _api_key(parser: argparse.ArgumentParser) -> None:
    from ftjobs.commands.common import API_KEY_HELP

    parser.add_argument("--api-key", default=None, help=API_KEY_HELP)


def _host_port(parser: argparse.ArgumentParser, settings) -> None:
    parser.add_argument("--host", default=settings.api_host, help="address to listen on (default: FTJOBS_API_HOST)")
    parser.add_argument("--port", type=int, default=settings.api_port, help="port (default: FTJOBS_API_PORT)")


def _process_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"need a whole number of processes, at least 1 (got {text!r})")
    return int(text)


def _api(args) -> None:
    import uvicorn

    from service.logs import configure_logging
    from service.migrate import upgrade_database

    settings = get_settings()
    configure_logging(settings)
    if not settings.database_url:
        upgrade_database(settings)  # the embedded SQLite database sets itself up; a real one is migrated by ops
    # httptools and uvloop by name rather than "auto": a missing one fails the start instead of falling back
    # in silence to the slower pure-Python h11 parser and the asyncio loop.
    with _metrics_shared_by(args.workers):
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            http="httptools",
            loop="uvloop",
            access_log=settings.access_log,
            log_config=None,
        )


@contextmanager
def _metrics_shared_by(workers: int):
    """With several API processes, each writes its counters and histograms to files in PROMETHEUS_MULTIPROC_DIR
    and every /metrics scrape sums them (service/metrics.py), whichever process answers it.

    prometheus_client reads the variable once, when it is imported, so it is set here in the parent, before
    uvicorn spawns the processes that import it. The directory must start empty, or an earlier run's counts
    would be added again: an operator's own directory loses its *.db files; else a temporary one is made for
    this run and removed after it. A dead process's files stay, so the sums never go backwards;
    mark_process_dead is not needed, as it only drops live-mode gauge files and the API has no Gauge.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield
    elif workers == 1:
        yield
    else:
        with tempfile.TemporaryDirectory(prefix="ftjobs-metrics-") as directory:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            try:
                yield
            finally:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _worker(args) -> None:
    from service.logs import configure_logging

    configure_logging(get_settings())
    from worker.celery_app import app

    argv = ["worker", "--loglevel", get_settings().log_level, "-Q", get_settings().queue_name]
    if args.name:
        argv += ["-n", args.name]
    app.worker_main(argv)


def _up(args) -> int:
    """The API in this process and one worker beside it, sharing the same settings.

    The worker runs in its own session, so a Ctrl-C on the terminal reaches it once, forwarded from here as
    SIGTERM after the API has stopped: it drains (the running job checkpoints and goes back to the queue).
    A second Ctrl-C or SIGTERM is forwarded too, and stops the job at once; it is requeued all the same.
    """
    from service.migrate import upgrade_database

    settings = get_settings()
    settings.ensure_dirs()
    upgrade_database(settings)
    _ensure_local_admin_key(settings)
    worker = subprocess.Popen(
        [sys.executable, "-m", "ftjobs.cli", "worker"], env=os.environ.copy(), start_new_session=True
    )
    # uvicorn re-raises the SIGTERM it shut down on; turning it into SystemExit lets `finally` stop the worker
    # instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _api(args)
    finally:
        _drain_worker(worker, settings.drain_seconds + 30)
    return 0


def _drain_worker(worker: subprocess.Popen, timeout_seconds: float) -> None:
    forward = lambda *_: worker.send_signal(signal.SIGTERM)  # noqa: E731 - a signal handler
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    if worker.poll() is None:
        print(
            "stopping the worker: the running job checkpoints and goes back to the queue "
            "(Ctrl-C again to stop it at once)",
            file=sys.stderr,
        )
        worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def _ensure_local_admin_key(settings) -> None:
    """The embedded stack's own admin key, on first start, so the CLI works with no key to paste."""
    from service.db import transaction
    from service.tenancy.keys import create_key, hash_key
    from service.tenancy.repository import find_active_key

    path = settings.api_key_file
    with transaction(settings) as session:
        if path.is_file() and find_active_key(session.connection(), hash_key(path.read_text().strip())):
            return
        path.unlink(missing_ok=True)  # a key of a database that was reset or revoked: replace it
        key, secret = create_key(session, "local", admin=True)
    # Created 0600 from the start: the key is never readable by other users, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    print(f"created the local admin key {key.id} in {path}", file=sys.stderr)


def _keys_create(args) -> int:
    from service.db import transaction
    from service.errors import ProblemError, to_problem
    from service.tenancy.keys import create_key
    from service.tenancy.repository import get_tenant_by_name

    if args.max_active_jobs is not None and args.max_active_jobs < 1:
        return _problem(args, {"code": "invalid_argument", "detail": "--max-active-jobs must be at least 1"})
    try:
        with transaction() as session:
            key, secret = create_key(
                session,
                args.tenant,
                admin=args.admin,
                max_active_jobs=args.max_active_jobs,
                webhook_url=args.webhook_url,
            )
            webhook_secret = get_tenant_by_name(session, args.tenant).webhook_secret if args.webhook_url else None
    except ProblemError as exc:  # a webhook URL that is not one
        return _problem(args, to_problem(exc))
    if args.json:
        print(
            json.dumps(
                {
                    "id": key.id,
                    "tenant": args.tenant,
                    "admin": key.admin,
                    "key": secret,
                    **({"webhook_url": args.webhook_url, "webhook_secret": webhook_secret} if webhook_secret else {}),
                }
            )
        )
        return 0
    if webhook_secret:
        print(f"webhook {args.webhook_url} signed with the tenant's secret: {webhook_secret}")
    print(f"created {'admin ' if key.admin else ''}key {key.id} for tenant {args.tenant}; it is shown only once:")
    print(secret)
    return 0


def _keys_list(args) -> int:
    from ftjobs.commands.common import table, when
    from service.db import transaction
    from service.tenancy.repository import list_keys

    with transaction() as session:
        rows = [
            {
                "id": key.id,
                "tenant": tenant.name,
                "admin": key.admin,
                "created_at": when(key.created_at),
                "revoked_at": when(key.revoked_at),
            }
            for key, tenant in list_keys(session)
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        table(
            ["KEY_ID", "TENANT", "ADMIN", "CREATED", "REVOKED"],
            [[r["id"], r["tenant"], "yes" if r["admin"] else "no", r["created_at"], r["revoked_at"]] for r in rows],
        )
    )
    return 0


def _keys_revoke(args) -> int:
    from service.db import transaction
    from service.errors import ProblemError, to_problem
    from service.tenancy.keys import revoke_key

    try:
        with transaction() as session:
            revoke_key(session, args.key_id)
    except ProblemError as exc:
        return _problem(args, to_problem(exc))
    print(json.dumps({"id": args.key_id, "revoked": True}) if args.json else f"revoked {args.key_id}")
    return 0


def cli_api_key(explicit: str | None) -> str | None:
    """--api-key, else FTJOBS_API_KEY, else the key `ftjobs up` wrote; None when there is none."""
    settings = get_settings()
    if explicit or settings.api_key:
        return explicit or settings.api_key
    path = settings.api_key_file
    return path.read_text().strip() if path.is_file() else None


def cli_url(explicit: str | None) -> str:
    """--url, else FTJOBS_URL, else the address `ftjobs up` and `ftjobs api` listen on."""
    settings = get_settings()
    return explicit or settings.url or f"http://{settings.api_host}:{settings.api_port}"


def _db(args) -> None:
    from service.migrate import upgrade_database

    upgrade_database(get_settings())
    print(json.dumps({"database": "latest"}) if args.json else "database is at the latest revision")


def _plan(args) -> int:
    from domain.spec import JobSpec
    from ftjobs.commands.jobs import read_spec
    from service.errors import ProblemError, to_problem
    from service.planning import plan_spec

    try:
        spec = JobSpec.model_validate(read_spec(args.spec))
        with _registry_session() as session:
            result = plan_spec(session, get_settings(), spec, model_roots=None)  # the operator may plan any path
    except ValidationError as exc:
        return _problem(args, {"code": "invalid_spec", "detail": _one_line(exc)})
    except ProblemError as exc:
        return _problem(args, to_problem(exc))
    print(result.model_dump_json(indent=2))
    return 0


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}" for error in exc.errors()
    )


@contextmanager
def _registry_session():
    """A session on the service's database when it has been set up, so plans see the registered GPUs."""
    from sqlalchemy import inspect

    from service.db import get_engine, session_factory

    settings = get_settings()
    embedded_db_missing = not settings.database_url and not (settings.resolved_home / "ftjobs.db").exists()
    if embedded_db_missing or not inspect(get_engine()).has_table("gpus"):
        yield None
        return
    with session_factory()() as session:
        yield session


def _problem(args, problem: dict) -> int:
    from ftjobs.commands.common import BAD_INPUT, report_error

    report_error(args, problem)
    return BAD_INPUT


def _demo(args) -> int:
    from ftjobs.demo import run_demo

    return run_demo(args.url, args.api_key)


if __name__ == "__main__":
    sys.exit(main())
