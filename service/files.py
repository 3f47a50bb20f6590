"""Storing uploaded datasets: streamed to a local spool under a size limit, hashed, optionally validated, then
put in the job storage, where every worker can read them."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from domain.datasets import validate_dataset
from domain.spec import DatasetFormat
from service.dataset_refs import upload_key
from service.errors import FileInUse, FileNotFound, InvalidCursor, UploadTooLarge
from service.jobs import repository
from service.jobs.service import ID_PATTERN, new_id
from service.models import UploadedFile
from service.settings import Settings
from service.storage import job_storage
from service.tenancy.keys import Caller

CHUNK_BYTES = 1024 * 1024
FILE_PURPOSE = "fine-tune"  # the one OpenAI purpose a fine-tuning service keeps files for


def store_upload(
    settings: Settings, source: BinaryIO, filename: str, dataset_format: DatasetFormat | None
) -> UploadedFile:
    """Put the upload in storage, and return its row, not yet owned or added. With a format, every row is
    checked now and the result remembered, so a job using the file does not read it again. No database work:
    a large upload holds no connection while it streams."""
    file_id = new_id("file")
    with tempfile.NamedTemporaryFile(dir=settings.resolved_home, prefix=".upload-", suffix=".jsonl") as spool:
        size_bytes, sha256 = _copy_limited(source, spool, settings.max_upload_bytes)
        spool.flush()
        rows = (
            validate_dataset(Path(spool.name), dataset_format, max_rows=settings.max_dataset_rows)
            if dataset_format
            else None
        )
        job_storage(settings).put_file(Path(spool.name), upload_key(file_id))
    return UploadedFile(
        id=file_id,
        filename=_printable(filename)[:255],
        size_bytes=size_bytes,
        sha256=sha256,
        rows=rows,
        validated_format=dataset_format.value if dataset_format else None,
    )


def record_upload(session: Session, uploaded: UploadedFile, caller: Caller) -> UploadedFile:
    uploaded.tenant_id = caller.tenant_id
    return repository.add_file(session, uploaded)


def _printable(filename: str) -> str:
    # The name is the client's; a NUL or a lone surrogate could not be stored as text.
    cleaned = "".join(ch for ch in filename if ch.isprintable() and not "\ud800" <= ch <= "\udfff")
    return cleaned or "dataset.jsonl"


def _copy_limited(source: BinaryIO, target: BinaryIO, limit_bytes: int) -> tuple[int, str]:
    digest, size_bytes = hashlib.sha256(), 0
    while chunk := source.read(CHUNK_BYTES):
        size_bytes += len(chunk)
        if size_bytes > limit_bytes:
            raise UploadTooLarge(f"uploads are limited to {limit_bytes} bytes", limit_bytes=limit_bytes)
        digest.update(chunk)
        target.write(chunk)
    return size_bytes, digest.hexdigest()


def load_file(session: Session, file_id: str, caller: Caller) -> UploadedFile:
    """The caller's file; another tenant's reads as missing, exactly like one that never existed."""
    uploaded = repository.get_file(session, file_id, caller.tenant_scope) if ID_PATTERN.fullmatch(file_id) else None
    if uploaded is None:
        raise FileNotFound(f"no file {file_id!r}")
    return uploaded


def list_files(
    session: Session, limit: int, after: str | None, newest_first: bool, purpose: str | None, caller: Caller
) -> tuple[list[UploadedFile], bool]:
    """A page of the caller's files, continuing after the file `after`; and whether more follow. Every file is
    a fine-tune file: another `purpose` lists none."""
    if purpose not in (None, FILE_PURPOSE):
        return [], False
    anchor = None
    if after is not None:
        anchor = repository.get_file(session, after, caller.tenant_scope) if ID_PATTERN.fullmatch(after) else None
        if anchor is None:
            raise InvalidCursor(f"no file {after!r} to continue after")
    files = repository.list_files(
        session, caller.tenant_scope, limit=limit + 1, after=anchor, newest_first=newest_first
    )
    return files[:limit], len(files) > limit


def delete_file(session: Session, settings: Settings, file_id: str, caller: Caller) -> str:
    """Forget the file; its bytes leave storage after the commit (remove_stored): removed before, a failed
    commit would leave a row whose content is gone. A job that has not ended still reads it, so that refuses."""
    uploaded = load_file(session, file_id, caller)
    if repository.file_in_active_job(session, job_storage(settings).url_of(upload_key(uploaded.id))):
        raise FileInUse(f"file {file_id} is a dataset of a job that has not ended")
    repository.delete_file(session, uploaded)
    return uploaded.id


def remove_stored(settings: Settings, file_id: str) -> None:
    storage = job_storage(settings)
    key = upload_key(file_id)
    if storage.exists(key):
        storage.delete_tree(key)
