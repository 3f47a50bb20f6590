"""Job files in one shared location: uploads, datasets given by path, checkpoints and artifacts.

The location is a URL (Settings.storage_url): a local directory (the embedded default; also what an NFS mount
or a Kubernetes ReadWriteMany volume gives) or `s3://bucket/prefix` through fsspec and s3fs, so that the API
and workers on different machines read and write the same files. Keys are '/'-separated paths under the root:

    files/{file_id}.jsonl                                uploads
    jobs/{job_id}/checkpoints/a{attempt}-step-{step}/     a checkpoint: its parts, then COMPLETE, written last
    jobs/{job_id}/artifacts/{name}                        what a succeeded job produced

A checkpoint directory counts only once its COMPLETE marker exists, and the marker is written after every
part, so a writer killed halfway leaves something no reader takes for a checkpoint. Each attempt writes under
its own prefix, so a stale attempt can never overwrite what a newer one wrote (service/jobs/attempts.py keeps
the record of which checkpoints count).
"""

from __future__ import annotations

import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from service.errors import StorageUnavailable

COMPLETE_MARKER = "COMPLETE"
CHUNK_BYTES = 1024 * 1024


class Storage:
    def __init__(self, url: str, s3_endpoint_url: str | None = None) -> None:
        self.url = url.rstrip("/")
        options = {}
        if url.startswith("s3://"):
            # No listing cache: another machine may have written a key a moment ago. Bounded retries, so an
            # unreachable endpoint fails readiness in seconds rather than after minutes of backoff.
            options = {
                "use_listings_cache": False,
                "skip_instance_cache": True,
                "config_kwargs": {
                    "connect_timeout": 3,
                    "read_timeout": 60,
                    "retries": {"max_attempts": 2, "mode": "standard"},
                },
            }
            if s3_endpoint_url:
                options["client_kwargs"] = {"endpoint_url": s3_endpoint_url}
        self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        self.root = root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def path(self, key: str) -> str:
        return posixpath.join(self.root, key) if key else self.root

    def url_of(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def local_path(self, key: str) -> Path | None:
        """The file on this machine's disk when storage is local (read in place, never copied), else None."""
        return Path(self.path(key)) if self.is_local else None

    def check(self) -> None:
        """Raise StorageUnavailable unless the root can be listed (readiness; the first touch of a request)."""
        try:
            if self.is_local:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return  # an empty bucket prefix lists as missing on S3: reachable all the same
        except Exception as exc:  # any transport error means the location cannot be used
            raise StorageUnavailable(f"storage {self.url} cannot be reached: {type(exc).__name__}: {exc}") from exc

    # --- single files -----------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self._guard(self.fs.exists, self.path(key))

    def size(self, key: str) -> int:
        return self._guard(self.fs.size, self.path(key))

    def fingerprint(self, key: str) -> tuple[int, str]:
        """The size, and a version that changes with the content: the mtime on disk, the ETag on S3."""
        info = self._guard(self.fs.info, self.path(key))
        return int(info["size"]), str(info.get("ETag") or info.get("mtime") or info.get("LastModified"))

    def put_file(self, local: Path, key: str) -> None:
        with open(local, "rb") as source, self._writing(key) as target:
            shutil.copyfileobj(source, target, CHUNK_BYTES)

    def get_file(self, key: str, local: Path) -> None:
        """Download atomically: a half-downloaded file is never left under `local`'s name."""
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.partial")
        try:
            self._guard(self.fs.get_file, self.path(key), str(partial))
            partial.replace(local)
        finally:
            partial.unlink(missing_ok=True)

    @contextmanager
    def open_read(self, key: str) -> Iterator[BinaryIO]:
        with self._guard(self.fs.open, self.path(key), "rb") as handle:
            yield handle

    def delete_tree(self, prefix: str) -> None:
        path = self.path(prefix)
        if self._guard(self.fs.exists, path):
            self._guard(self.fs.rm, path, recursive=True)

    # --- directories with a completion marker -----------------------------------------------------------

    def put_tree(self, local_dir: Path, prefix: str) -> None:
        """Upload every file under `local_dir`, then COMPLETE: readers never take a partial tree as whole."""
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
            self.put_file(path, f"{prefix}/{path.relative_to(local_dir).as_posix()}")
        marker = local_dir / COMPLETE_MARKER
        with self._writing(f"{prefix}/{COMPLETE_MARKER}") as target:
            target.write(marker.read_bytes() if marker.is_file() else b"complete\n")

    def is_complete(self, prefix: str) -> bool:
        return self.exists(f"{prefix}/{COMPLETE_MARKER}")

    def get_tree(self, prefix: str, local_dir: Path) -> None:
        """Download a complete tree into `local_dir`, its marker last, so the local copy is atomic too."""
        if not self.is_complete(prefix):
            raise FileNotFoundError(f"{self.url_of(prefix)} is not a complete tree")
        base = self.path(prefix)
        files = [path for path in self._guard(self.fs.find, base) if posixpath.basename(path) != COMPLETE_MARKER]
        for path in files:
            self.get_file(posixpath.relpath(path, self.root), local_dir / posixpath.relpath(path, base))
        self.get_file(f"{prefix}/{COMPLETE_MARKER}", local_dir / COMPLETE_MARKER)

    def list_tree(self, prefix: str) -> list[tuple[str, int]]:
        """(path relative to the prefix, size) of every file under it, sorted."""
        base = self.path(prefix)
        if not self._guard(self.fs.exists, base):
            return []
        found = self._guard(self.fs.find, base, detail=True)
        return sorted((posixpath.relpath(path, base), int(info["size"])) for path, info in found.items())

    # --- plumbing ---------------------------------------------------------------------------------------

    @contextmanager
    def _writing(self, key: str) -> Iterator[BinaryIO]:
        """A writable handle whose content appears under `key` only when the block ends without an error.

        The bytes go to a local temp file first. On a local disk it is renamed into place; to S3 it is uploaded
        once complete (an object appears whole when its upload finishes). A block that fails (an upload over its
        limit) leaves nothing behind: an fsspec file closed on error would upload what it had buffered.
        """
        path = self.path(key)
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        directory = Path(path).parent if self.is_local else None
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".partial-", delete=False) as target:
            partial = Path(target.name)
        try:
            with open(partial, "wb") as target:
                yield target
            if self.is_local:
                partial.replace(path)
            else:
                self._guard(self.fs.put_file, str(partial), path)
        finally:
            partial.unlink(missing_ok=True)

    def _guard(self, operation, *args, **kwargs):
        """Run a storage call; a transport failure becomes StorageUnavailable (a missing key stays itself)."""
        try:
            return operation(*args, **kwargs)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise
        except Exception as exc:  # botocore's and aiohttp's errors are not OSErrors: any of them means unreachable
            raise StorageUnavailable(f"storage {self.url}: {type(exc).__name__}: {exc}") from exc


def is_local_url(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_copy(url: str, target: Path, s3_endpoint_url: str | None = None) -> Path:
    """A file on this machine's disk with the content at `url`: the file itself when it is local, else a
    download to `target`."""
    if is_local_url(url):
        return Path(url.removeprefix("file://"))
    parent, name = url.rsplit("/", 1)
    storage_at(parent, s3_endpoint_url).get_file(name, target)
    return target


@lru_cache(maxsize=8)
def storage_at(url: str, s3_endpoint_url: str | None = None) -> Storage:
    return Storage(url, s3_endpoint_url)


def job_storage(settings) -> Storage:
    """The storage location for uploads, checkpoints and artifacts."""
    return storage_at(settings.resolved_storage_url, settings.s3_endpoint_url)


def data_storage(settings) -> Storage:
    """Where datasets given by path are resolved."""
    return storage_at(settings.resolved_data_root, settings.s3_endpoint_url)
