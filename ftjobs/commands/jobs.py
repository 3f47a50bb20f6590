"""`ftjobs submit`, `ftjobs status` and `ftjobs jobs list|get|cancel|events|download`."""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from ftjobs.client import Event, Job, draw_progress
from ftjobs.commands.common import SUCCEEDED, client_of, emit, job_error_line, job_outcome, table, when


class SpecFileError(Exception):
    """The spec file cannot be read or is not a JSON object: bad input, exit 2."""


def register(commands, parent: argparse.ArgumentParser) -> None:
    submit = commands.add_parser(
        "submit",
        parents=[parent],
        help="submit a job spec (a JSON file)",
        description="Submit a job spec; with --watch, follow it to its end.",
    )
    submit.add_argument("spec", type=Path, help="the job spec, a JSON file (see JobSpec in /openapi.json)")
    submit.add_argument(
        "--watch", action="store_true", help="show progress until the job ends; exit 1 unless it succeeds"
    )
    submit.set_defaults(run=_submit)
    status = commands.add_parser(
        "status",
        parents=[parent],
        help="show a job's progress",
        description="A job's progress line; exit 1 for a failed or cancelled job.",
    )
    status.add_argument("job_id", help="the job's id (job_...)")
    status.add_argument("--watch", action="store_true", help="keep polling until the job ends")
    status.set_defaults(run=_status)
    _jobs_parser(commands, parent)


def _jobs_parser(commands, parent: argparse.ArgumentParser) -> None:
    jobs = commands.add_parser(
        "jobs",
        help="list, read, cancel and follow jobs; download their artifacts",
        description="Jobs of the caller's tenant.",
    )
    actions = jobs.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[parent], help="the newest jobs first, a page at a time")
    listing.add_argument(
        "--status",
        choices=["queued", "running", "cancelling", "succeeded", "failed", "cancelled"],
        help="only jobs in this state",
    )
    listing.add_argument("--limit", type=int, default=50, help="jobs per page, 1 to 200 (default 50)")
    listing.add_argument("--after", default=None, help="the next_cursor a previous page printed")
    listing.set_defaults(run=_list)
    get = actions.add_parser("get", parents=[parent], help="a job in full; exit 1 if it failed or was cancelled")
    get.add_argument("job_id", help="the job's id (job_...)")
    get.set_defaults(run=_get)
    cancel = actions.add_parser("cancel", parents=[parent], help="cancel a queued or running job")
    cancel.add_argument("job_id", help="the job's id (job_...)")
    cancel.set_defaults(run=_cancel)
    events = actions.add_parser("events", parents=[parent], help="a job's events (state, progress, checkpoint)")
    events.add_argument("job_id", help="the job's id (job_...)")
    events.add_argument("--after", type=int, default=0, help="only events after this seq (default 0: all)")
    events.add_argument(
        "--follow", action="store_true", help="keep printing new events until the job ends; exit 1 unless it succeeds"
    )
    events.set_defaults(run=_events)
    download = actions.add_parser("download", parents=[parent], help="every artifact of a job, as one tar archive")
    download.add_argument("job_id", help="the job's id (job_...)")
    download.add_argument(
        "-o", "--output", type=Path, default=None, help="where to write the archive (default: ./JOB_ID-artifacts.tar)"
    )
    download.add_argument(
        "--extract",
        type=Path,
        default=None,
        metavar="DIR",
        help="unpack the archive into DIR instead of keeping the .tar",
    )
    download.set_defaults(run=_download)


def read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except OSError as exc:
        raise SpecFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecFileError(f"{path} is not JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise SpecFileError(f"{path} holds JSON {type(spec).__name__}, not an object")
    return spec


def _submit(args) -> int:
    client = client_of(args)
    job = client.submit(read_spec(args.spec))
    if not args.watch:
        emit(args, job, f"submitted {job.id} ({job.status})")
        return SUCCEEDED
    if not args.json:
        print(f"submitted {job.id}")
    return _final(args, client.watch(job.id, out=None if args.json else sys.stdout))


def _status(args) -> int:
    client = client_of(args)
    if args.watch:
        job = client.watch(args.job_id, out=None if args.json else sys.stdout)
    else:
        job = client.job(args.job_id)
        if not args.json:
            draw_progress(job)
    return _final(args, job)


def _final(args, job: Job) -> int:
    """The job as JSON with --json, else its error line if it has one; the exit code of its outcome."""
    emit(args, job, job_error_line(job))
    return job_outcome(job)


def _list(args) -> int:
    page = client_of(args).jobs(status=args.status, limit=args.limit, after=args.after)
    rows = [[job.id, job.status, job.spec.get("base_model"), _steps(job), when(job.created_at)] for job in page.data]
    text = table(["ID", "STATUS", "BASE_MODEL", "STEP", "CREATED"], rows)
    emit(args, page, text + (f"\nnext page: --after {page.next_cursor}" if page.next_cursor else ""))
    return SUCCEEDED


def _get(args) -> int:
    job = client_of(args).job(args.job_id)
    emit(args, job, _describe(job))
    return job_outcome(job)


def _describe(job: Job) -> str:
    lines = [
        f"id        {job.id}",
        f"status    {job.status}",
        f"model     {job.spec.get('base_model')}",
        f"method    {job.spec.get('method', '-')}",
        f"step      {_steps(job)}",
        f"created   {when(job.created_at)}",
        f"started   {when(job.started_at) or '-'}",
        f"finished  {when(job.finished_at) or '-'}",
    ]
    if (loss := (job.progress or {}).get("loss")) is not None:
        lines.append(f"loss      {loss:.4f}")
    lines += [f"artifact  {artifact.name} ({artifact.size_bytes} bytes)" for artifact in job.artifacts]
    if error := job_error_line(job):
        lines.append(error)
    return "\n".join(lines)


def _steps(job: Job) -> str:
    progress = job.progress or {}
    return f"{progress.get('step', 0)}/{progress.get('total_steps') or '?'}"


def _cancel(args) -> int:
    job = client_of(args).cancel(args.job_id)
    emit(args, job, f"{job.id} {job.status}")
    return SUCCEEDED


def _events(args) -> int:
    client = client_of(args)
    if not args.follow:
        page = client.events(args.job_id, after=args.after, limit=1000)
        emit(args, page, "\n".join(_event_line(event) for event in page.data) or None)
        return SUCCEEDED
    for event in client.follow_events(args.job_id, after=args.after):
        # One JSON object per line with --json, so a reader can act on each as it arrives.
        print(event.model_dump_json() if args.json else _event_line(event), flush=True)
    job = client.job(args.job_id)
    if not args.json and (error := job_error_line(job)):
        print(error)
    return job_outcome(job)


def _event_line(event: Event) -> str:
    data = event.data
    if event.kind == "state":
        summary = data.get("status", "")
    elif event.kind == "progress":
        summary = f"step {data.get('step')}/{data.get('total_steps')} loss {data.get('loss')}"
    else:
        summary = json.dumps(data, separators=(",", ":"))
    return f"{event.seq:>6}  {when(event.created_at)}  {event.kind:<10}  {summary}"


def _download(args) -> int:
    client = client_of(args)
    if args.extract is None:
        target = args.output or Path(f"{args.job_id}-artifacts.tar")
        client.download_artifacts(args.job_id, target)
        emit(
            args,
            {"job_id": args.job_id, "archive": str(target), "size_bytes": target.stat().st_size},
            f"wrote {target} ({target.stat().st_size} bytes)",
        )
        return SUCCEEDED
    with tempfile.TemporaryDirectory() as scratch:
        archive = client.download_artifacts(args.job_id, Path(scratch) / "artifacts.tar")
        with tarfile.open(archive) as tar:
            names = tar.getnames()
            tar.extractall(args.extract, filter="data")  # "data": no member may land outside DIR
    emit(
        args,
        {"job_id": args.job_id, "directory": str(args.extract), "files": names},
        f"extracted {len(names)} files into {args.extract}",
    )
    return SUCCEEDED
