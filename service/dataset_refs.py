"""Turning a spec's dataset reference into a file on disk that has been validated once, within the limits."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from sqlalchemy.orm import Session

from planner.spec import DatasetFormat, DatasetRef
from service.datasets import validate_dataset
from service.errors import DatasetNotFound, DatasetPathEscapes, DatasetTooLarge
from service.jobs import repository
from service.settings import Settings


def resolve_dataset(session: Session, settings: Settings, ref: DatasetRef, tenant_id: str,
                    dataset_format: DatasetFormat) -> Path:
    """The dataset's path, checked row by row at most once per file and format."""
    if ref.file_id is not None:
        return _uploaded(session, settings, ref.file_id, tenant_id, dataset_format)
    path = _under_data_root(settings, ref.path)
    stat = path.stat()
    if stat.st_size > settings.max_dataset_bytes:
        raise DatasetTooLarge(f"{ref.path!r} is {stat.st_size} bytes; the limit is {settings.max_dataset_bytes}")
    _validated_rows(str(path), stat.st_size, stat.st_mtime_ns, dataset_format.value, settings.max_dataset_rows)
    return path


def _uploaded(session: Session, settings: Settings, file_id: str, tenant_id: str,
              dataset_format: DatasetFormat) -> Path:
    # Another tenant's file reads as missing, exactly like one that never existed.
    uploaded = repository.get_file(session, file_id, tenant_id)
    if uploaded is None:
        raise DatasetNotFound(f"no uploaded file {file_id}")
    path = settings.uploads_dir / f"{file_id}.jsonl"
    if uploaded.validated_format != dataset_format.value:
        rows = validate_dataset(path, dataset_format, max_rows=settings.max_dataset_rows)
        repository.record_file_validation(session, file_id, dataset_format.value, rows)
    return path


def _under_data_root(settings: Settings, relative: str) -> Path:
    root = settings.datasets_root
    try:
        # resolve() follows symlinks, so a link inside the root that points outside it is caught too.
        path = (root / relative).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        raise DatasetNotFound(f"{relative!r} is not a file under the data root") from None
    if not path.is_relative_to(root):
        raise DatasetPathEscapes(f"{relative!r} resolves outside the data root")
    if not path.is_file():
        raise DatasetNotFound(f"{relative!r} is not a file under the data root")
    return path


# A file under the data root is re-checked only when its size or modification time changes: the same dataset
# submitted again costs a stat, not a full read.
@lru_cache(maxsize=1024)
def _validated_rows(path: str, size_bytes: int, mtime_ns: int, dataset_format: str, max_rows: int) -> int:
    return validate_dataset(path, dataset_format, max_rows=max_rows)
