"""Turning a spec's dataset reference into a validated file on disk."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.orm import Session

from planner.spec import DatasetRef
from service.errors import DatasetNotFound, DatasetPathEscapes
from service.jobs import repository
from service.settings import Settings


def resolve_dataset(session: Session, settings: Settings, ref: DatasetRef) -> Path:
    if ref.file_id is not None:
        if repository.get_file(session, ref.file_id) is None:
            raise DatasetNotFound(f"no uploaded file {ref.file_id}")
        return settings.uploads_dir / f"{ref.file_id}.jsonl"
    root = settings.datasets_root
    # resolve() follows symlinks, so a link inside the root that points outside it is caught too.
    path = (root / ref.path).resolve()
    if not path.is_relative_to(root):
        raise DatasetPathEscapes(f"{ref.path!r} resolves outside the data root")
    if not path.is_file():
        raise DatasetNotFound(f"{ref.path!r} is not a file under the data root")
    return path
