"""/v1/files against the real PostgreSQL and storage: pages that never repeat or skip a file, and a delete that
removes the stored object with the row."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app


@pytest.fixture()
def tenant_client(database, settings, make_key):
    key = make_key("files-pages")  # a tenant of its own: the list holds exactly what this test uploads
    with TestClient(create_app(settings), headers=key.headers) as client:
        yield client


def test_files_page_newest_first_and_a_delete_removes_the_object(tenant_client, settings):
    ids = [
        tenant_client.post("/v1/files", files={"file": (f"{i}.jsonl", io.BytesIO(b'{"text": "hi"}\n'))}).json()["id"]
        for i in range(3)
    ]
    first = tenant_client.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == ids[::-1][:2] and first["next_cursor"] == ids[1]
    rest = tenant_client.get("/v1/files", params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["next_cursor"] is None
    assert tenant_client.get("/v1/files", params={"after": "file_nope"}).json()["code"] == "invalid_cursor"
    # A NUL, which PostgreSQL text refuses, is an unknown id like any other, never a 500.
    assert tenant_client.get("/v1/files", params={"after": "file_\x00"}).json()["code"] == "invalid_cursor"
    assert tenant_client.get("/v1/files/file_%00").json()["code"] == "file_not_found"

    stored = Path(settings.resolved_storage_url) / "files" / f"{ids[0]}.jsonl"
    assert stored.is_file()
    deleted = tenant_client.delete(f"/v1/files/{ids[0]}")
    assert deleted.status_code == 200 and deleted.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert not stored.exists()
    assert tenant_client.delete(f"/v1/files/{ids[0]}").json()["code"] == "file_not_found"
    assert [f["id"] for f in tenant_client.get("/v1/files").json()["data"]] == ids[:0:-1]
