"""Turning a spec's dataset reference into the URL of a file in storage, validated once, within the limits."""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from domain.datasets import validate_dataset
from domain.errors import DatasetNotFound, DatasetTooLarge
from domain.spec import DatasetFormat, DatasetRef
from service.errors import DatasetPathEscapes
from service.jobs import repository
from service.settings import Settings
from service.storage import Storage, data_storage, job_storage, local_copy


def upload_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def resolve_dataset(
    session: Session, settings: Settings, ref: DatasetRef, tenant_id: str, dataset_format: DatasetFormat
) -> str:
    """The dataset's URL (an upload in the job storage, or a path under the data root), its rows checked at most
    once per file and format."""
    if ref.file_id is not None:
        return _uploaded(session, settings, ref.file_id, tenant_id, dataset_format)
    storage = data_storage(settings)
    key = _key_under_root(storage, ref.path)
    size_bytes, version = storage.fingerprint(key)
    if size_bytes > settings.max_dataset_bytes:
        raise DatasetTooLarge(f"{ref.path!r} is {size_bytes} bytes; the limit is {settings.max_dataset_bytes}")
    url = storage.url_of(key)
    _validate_once(session, settings, url, size_bytes, version, dataset_format)
    return url


def _validate_once(
    session: Session, settings: Settings, url: str, size_bytes: int, version: str, dataset_format: DatasetFormat
) -> None:
    """Check every row the first time this file (this size, this version) is used in this format, and record
    the result in the database, where every API process finds it: a 1e6-row dataset costs a read once, then a
    lookup. A row count over today's limit is refused even when it was recorded under a larger one."""
    rows = repository.validated_rows(session, url, size_bytes, version, dataset_format.value)
    if rows is None:
        with local_dataset(url, settings) as path:
            rows = validate_dataset(path, dataset_format, max_rows=settings.max_dataset_rows)
        repository.record_dataset_validation(session, url, size_bytes, version, dataset_format.value, rows)
    elif rows > settings.max_dataset_rows:
        raise DatasetTooLarge(f"{url!r} has {rows} rows; the limit is {settings.max_dataset_rows}")


def _uploaded(session: Session, settings: Settings, file_id: str, tenant_id: str, dataset_format: DatasetFormat) -> str:
    # Another tenant's file reads as missing, exactly like one that never existed.
    uploaded = repository.get_file(session, file_id, tenant_id)
    if uploaded is None:
        raise DatasetNotFound(f"no uploaded file {file_id}")
    url = job_storage(settings).url_of(upload_key(file_id))
    if uploaded.validated_format != dataset_format.value:
        with local_dataset(url, settings) as path:
            rows = validate_dataset(path, dataset_format, max_rows=settings.max_dataset_rows)
        repository.record_file_validation(session, file_id, dataset_format.value, rows)
    return url


def _key_under_root(storage: Storage, relative: str) -> str:
    """The key of an existing file under the data root; a path that leaves it is refused."""
    if storage.is_local:
        root = Path(storage.root).resolve()
        try:
            # resolve() follows symlinks, so a link inside the root that points outside it is caught too.
            path = (root / relative).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
            raise DatasetNotFound(f"{relative!r} is not a file under the data root") from None
        if not path.is_relative_to(root):
            raise DatasetPathEscapes(f"{relative!r} resolves outside the data root")
        if not path.is_file():
            raise DatasetNotFound(f"{relative!r} is not a file under the data root")
        return path.relative_to(root).as_posix()
    key = posixpath.normpath(relative.lstrip("/"))
    if key.startswith("..") or key == ".":
        raise DatasetPathEscapes(f"{relative!r} resolves outside the data root")
    if not storage.exists(key):
        raise DatasetNotFound(f"{relative!r} is not a file under the data root")
    return key


def local_dataset(url: str, settings: Settings):
    """The dataset on this machine's disk for as long as the block runs (a temp download if it is remote)."""
    return _local_copy_of(url, settings.resolved_home, settings.s3_endpoint_url)


@contextmanager
def _local_copy_of(url: str, home: Path, s3_endpoint_url: str | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir=home, prefix=".dataset-") as scratch:
        yield local_copy(url, Path(scratch) / "dataset.jsonl", s3_endpoint_url)
