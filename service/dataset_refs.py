"""Turning a spec's dataset reference into the URL of a file in storage, and a local copy to validate."""

from __future__ import annotations

import posixpath
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.orm import Session

from planner.spec import DatasetRef
from service.errors import DatasetNotFound, DatasetPathEscapes
from service.jobs import repository
from service.settings import Settings
from service.storage import data_storage, job_storage, local_copy


def upload_key(file_id: str) -> str:
    return f"files/{file_id}.jsonl"


def resolve_dataset(session: Session, settings: Settings, ref: DatasetRef) -> str:
    """The dataset's URL: an upload in the job storage, or a path under the data root."""
    if ref.file_id is not None:
        if repository.get_file(session, ref.file_id) is None:
            raise DatasetNotFound(f"no uploaded file {ref.file_id}")
        return job_storage(settings).url_of(upload_key(ref.file_id))
    storage = data_storage(settings)
    if storage.is_local:
        return str(_local_path_under(Path(storage.root), ref.path))
    key = posixpath.normpath(ref.path.lstrip("/"))
    if key.startswith("..") or key == ".":
        raise DatasetPathEscapes(f"{ref.path!r} resolves outside the data root")
    if not storage.exists(key):
        raise DatasetNotFound(f"{ref.path!r} is not a file under the data root")
    return storage.url_of(key)


def _local_path_under(root: Path, relative: str) -> Path:
    root = root.resolve()
    # resolve() follows symlinks, so a link inside the root that points outside it is caught too.
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise DatasetPathEscapes(f"{relative!r} resolves outside the data root")
    if not path.is_file():
        raise DatasetNotFound(f"{relative!r} is not a file under the data root")
    return path


@contextmanager
def local_dataset(url: str, settings: Settings) -> Iterator[Path]:
    """The dataset on this machine's disk for as long as the block runs (a temp download if it is remote)."""
    with tempfile.TemporaryDirectory(dir=settings.resolved_home, prefix=".dataset-") as scratch:
        yield local_copy(url, Path(scratch) / "dataset.jsonl", settings.s3_endpoint_url)
