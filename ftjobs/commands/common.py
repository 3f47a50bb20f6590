"""What every client command shares: the URL, key and --json options, the exit codes, and printing."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import BaseModel

from ftjobs.client import Client, Job

SUCCEEDED, JOB_DID_NOT_SUCCEED, BAD_INPUT, UNREACHABLE = 0, 1, 2, 3
API_KEY_HELP = "default: FTJOBS_API_KEY, else the local admin key `ftjobs up` wrote to FTJOBS_HOME/api-key"


def json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print machine-readable JSON on stdout (errors as one problem+json line on stderr)",
    )


def connection_options() -> argparse.ArgumentParser:
    """A parent parser for every command that talks to the server."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--url",
        default=None,
        help="the API's base URL (default: FTJOBS_URL, else http://FTJOBS_API_HOST:FTJOBS_API_PORT)",
    )
    parent.add_argument("--api-key", default=None, help=API_KEY_HELP)
    json_option(parent)
    return parent


def client_of(args: argparse.Namespace) -> Client:
    from ftjobs.cli import cli_api_key, cli_url

    return Client(cli_url(args.url), cli_api_key(args.api_key))


def emit(args: argparse.Namespace, result: BaseModel | dict[str, Any] | list, human: str | None = None) -> None:
    """The result as JSON with --json, else the human text (nothing when there is none)."""
    if args.json:
        print(json.dumps(as_json(result), indent=2))
    elif human is not None:
        print(human)


def as_json(result: BaseModel | dict[str, Any] | list) -> Any:
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, list):
        return [as_json(item) for item in result]
    return result


def job_outcome(job: Job) -> int:
    """0 unless the job has ended without succeeding."""
    return JOB_DID_NOT_SUCCEED if job.status in ("failed", "cancelled") else SUCCEEDED


def job_error_line(job: Job) -> str | None:
    if job.error is None:
        return None
    return f"error {job.error.code}: {job.error.message or '(no message)'}"


def report_error(args: argparse.Namespace, problem: dict[str, Any]) -> None:
    """One line on stderr: the problem as JSON with --json, else `ftjobs: CODE: DETAIL`."""
    if getattr(args, "json", False):
        print(json.dumps(problem), file=sys.stderr)
    else:
        detail = " ".join(str(problem.get("detail", "")).split())  # one line, whatever the detail holds
        print(f"ftjobs: {problem.get('code')}: {detail}", file=sys.stderr)


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[("-" if value is None else str(value)) for value in row] for row in rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip() for row in cells
    )


def when(value) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
