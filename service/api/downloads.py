"""Answering with a file from the job storage: read in place when it is local, streamed when it is remote."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.responses import FileResponse, Response, StreamingResponse

from service.errors import ProblemError
from service.storage import CHUNK_BYTES, Storage


def stored_file_response(storage: Storage, key: str, filename: str, media_type: str, missing: ProblemError) -> Response:
    local = storage.local_path(key)
    if local is not None:
        if not local.is_file():
            raise missing
        return FileResponse(local, filename=filename, media_type=media_type)
    if not storage.exists(key):
        raise missing
    return StreamingResponse(
        _chunks(storage, key),
        media_type=media_type,
        headers={"Content-Length": str(storage.size(key)), "Content-Disposition": f'attachment; filename="{filename}"'},
    )


def _chunks(storage: Storage, key: str) -> Iterator[bytes]:
    with storage.open_read(key) as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk
