"""`ftjobs files upload|list|get|delete`: datasets uploaded to the service."""

from __future__ import annotations

import argparse
from pathlib import Path

from domain.spec import DatasetFormat
from ftjobs.client import File
from ftjobs.commands.common import SUCCEEDED, client_of, emit, table, when


def register(commands, parent: argparse.ArgumentParser) -> None:
    files = commands.add_parser(
        "files",
        help="upload, list, read and delete dataset files",
        description="Dataset files of the caller's tenant (JSONL).",
    )
    actions = files.add_subparsers(required=True, metavar="ACTION")
    upload = actions.add_parser("upload", parents=[parent], help="upload a JSONL dataset; prints its file id")
    upload.add_argument("path", type=Path, help="the JSONL file")
    upload.add_argument(
        "--format",
        choices=[f.value for f in DatasetFormat],
        default=None,
        help="check every row in this format now, so a bad row is refused at upload",
    )
    upload.set_defaults(run=_upload)
    listing = actions.add_parser("list", parents=[parent], help="the newest files first, a page at a time")
    listing.add_argument("--limit", type=int, default=50, help="files per page, 1 to 200 (default 50)")
    listing.add_argument("--after", default=None, help="the next_cursor a previous page printed")
    listing.set_defaults(run=_list)
    get = actions.add_parser("get", parents=[parent], help="one file's details")
    get.add_argument("file_id", help="the file's id (file_...)")
    get.set_defaults(run=_get)
    delete = actions.add_parser("delete", parents=[parent], help="delete a file no running or queued job reads")
    delete.add_argument("file_id", help="the file's id (file_...)")
    delete.set_defaults(run=_delete)


def _upload(args) -> int:
    uploaded = client_of(args).upload(args.path, args.format)
    emit(args, uploaded, f"uploaded {uploaded.id} ({_summary(uploaded)})")
    return SUCCEEDED


def _list(args) -> int:
    page = client_of(args).files(limit=args.limit, after=args.after)
    rows = [[f.id, f.filename, f.size_bytes, f.rows, f.validated_format, when(f.created_at)] for f in page.data]
    text = table(["ID", "FILENAME", "BYTES", "ROWS", "FORMAT", "CREATED"], rows)
    emit(args, page, text + (f"\nnext page: --after {page.next_cursor}" if page.next_cursor else ""))
    return SUCCEEDED


def _get(args) -> int:
    found = client_of(args).file(args.file_id)
    emit(args, found, f"{found.id}  {_summary(found)}  created {when(found.created_at)}")
    return SUCCEEDED


def _delete(args) -> int:
    client_of(args).delete_file(args.file_id)
    emit(args, {"id": args.file_id, "deleted": True}, f"deleted {args.file_id}")
    return SUCCEEDED


def _summary(uploaded: File) -> str:
    rows = f", {uploaded.rows} {uploaded.validated_format} rows" if uploaded.rows is not None else ""
    return f"{uploaded.filename}, {uploaded.size_bytes} bytes{rows}"
