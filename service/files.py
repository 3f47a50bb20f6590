"""Storing uploaded datasets: streamed to disk under a size limit, hashed, optionally validated."""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO

from sqlalchemy.orm import Session

from planner.spec import DatasetFormat
from service.datasets import validate_dataset
from service.errors import UploadTooLarge
from service.jobs import repository
from service.jobs.service import new_id
from service.models import UploadedFile
from service.settings import Settings

CHUNK_BYTES = 1024 * 1024


def store_upload(session: Session, settings: Settings, source: BinaryIO, filename: str,
                 dataset_format: DatasetFormat | None, tenant_id: str) -> UploadedFile:
    """Store the upload for the tenant. With a format, every row is checked now and the result remembered,
    so a job using the file does not read it again."""
    file_id = new_id("file")
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    final = settings.uploads_dir / f"{file_id}.jsonl"
    partial = final.with_suffix(".partial")
    try:
        size_bytes, sha256 = _copy_limited(source, partial, settings.max_upload_bytes)
        rows = validate_dataset(partial, dataset_format, max_rows=settings.max_dataset_rows) if dataset_format else None
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    uploaded = UploadedFile(id=file_id, tenant_id=tenant_id, filename=_printable(filename)[:255],
                            size_bytes=size_bytes, sha256=sha256, rows=rows,
                            validated_format=dataset_format.value if dataset_format else None)
    return repository.add_file(session, uploaded)


def _printable(filename: str) -> str:
    # The name is the client's; a NUL or a lone surrogate could not be stored as text.
    cleaned = "".join(ch for ch in filename if ch.isprintable() and not "\ud800" <= ch <= "\udfff")
    return cleaned or "dataset.jsonl"


def _copy_limited(source: BinaryIO, target, limit_bytes: int) -> tuple[int, str]:
    digest, size_bytes = hashlib.sha256(), 0
    with open(target, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            size_bytes += len(chunk)
            if size_bytes > limit_bytes:
                raise UploadTooLarge(f"uploads are limited to {limit_bytes} bytes", limit_bytes=limit_bytes)
            digest.update(chunk)
            out.write(chunk)
    return size_bytes, digest.hexdigest()
