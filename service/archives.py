"""A job's whole artifact set as one tar archive, streamed from storage file by file: the archive is never
built in memory or on disk, whatever the size of the merged model in it."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator

from service.errors import ArtifactNotFound
from service.storage import CHUNK_BYTES, Storage

BLOCK_BYTES = tarfile.BLOCKSIZE  # 512: every member's header and content are padded to whole blocks
END_OF_ARCHIVE = b"\0" * (2 * BLOCK_BYTES)


def artifact_members(storage: Storage, job_id: str, names: list[str]) -> list[tuple[tarfile.TarInfo, str]]:
    """Each artifact's tar header and storage key, sized from storage itself (what will be streamed); an artifact
    gone from storage is a 404 now, before any byte of the archive is sent."""
    members, now = [], int(time.time())
    for name in sorted(names):
        key = f"jobs/{job_id}/artifacts/{name}"
        try:
            size = storage.size(key)
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {name!r} of job {job_id} is gone from storage") from None
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, now, 0o644
        members.append((info, key))
    return members


def archive_bytes(members: list[tuple[tarfile.TarInfo, str]]) -> int:
    """The archive's exact length, for Content-Length."""
    return sum(len(_header(info)) + _padded(info.size) for info, _ in members) + len(END_OF_ARCHIVE)


def archive_chunks(storage: Storage, members: list[tuple[tarfile.TarInfo, str]]) -> Iterator[bytes]:
    for info, key in members:
        yield _header(info)
        with storage.open_read(key) as handle:
            while chunk := handle.read(CHUNK_BYTES):
                yield chunk
        yield b"\0" * (_padded(info.size) - info.size)
    yield END_OF_ARCHIVE


def _header(info: tarfile.TarInfo) -> bytes:
    # PAX, so a name past ustar's 100 characters, or not ASCII, is stored whole.
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _padded(size: int) -> int:
    return -(-size // BLOCK_BYTES) * BLOCK_BYTES
