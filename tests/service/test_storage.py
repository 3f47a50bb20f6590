"""The storage layer on a local directory and on a real S3 endpoint (moto's server): trees count only once
complete, failed writes leave nothing, and an unreachable location is a 503 with the reason, never a 500."""

from __future__ import annotations

import io

import pytest

from service.errors import StorageUnavailable, UploadTooLarge
from service.storage import COMPLETE_MARKER, Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Storage(f"s3://ftjobs/unit-{tmp_path.name}", endpoint)


def test_a_tree_is_complete_only_once_its_marker_is_written(storage, tmp_path):
    source = tmp_path / "ckpt"
    (source / "sub").mkdir(parents=True)
    (source / "weights.safetensors").write_bytes(b"w" * 3000)
    (source / "sub" / "state.json").write_text("{}")
    (source / COMPLETE_MARKER).write_text('{"step": 5}')
    assert not storage.is_complete("jobs/j/checkpoints/a1-step-000005")
    storage.put_file(source / "weights.safetensors", "jobs/j/checkpoints/a1-step-000005/weights.safetensors")
    assert not storage.is_complete("jobs/j/checkpoints/a1-step-000005")  # parts alone are no checkpoint
    with pytest.raises(FileNotFoundError):
        storage.get_tree("jobs/j/checkpoints/a1-step-000005", tmp_path / "half")

    storage.put_tree(source, "jobs/j/checkpoints/a1-step-000005")
    assert storage.is_complete("jobs/j/checkpoints/a1-step-000005")
    assert storage.list_tree("jobs/j/checkpoints/a1-step-000005") == [
        (COMPLETE_MARKER, 11),
        ("sub/state.json", 2),
        ("weights.safetensors", 3000),
    ]
    storage.get_tree("jobs/j/checkpoints/a1-step-000005", tmp_path / "copy")
    assert (tmp_path / "copy" / "weights.safetensors").read_bytes() == b"w" * 3000
    assert (tmp_path / "copy" / COMPLETE_MARKER).read_text() == '{"step": 5}'
    storage.delete_tree("jobs/j/checkpoints/a1-step-000005")
    assert not storage.exists("jobs/j/checkpoints/a1-step-000005/weights.safetensors")


def test_a_failed_write_leaves_nothing_behind(storage):
    with pytest.raises(UploadTooLarge):
        with storage._writing("files/big.jsonl") as target:
            target.write(b"partial bytes")
            raise UploadTooLarge("over the limit")
    assert not storage.exists("files/big.jsonl")
    assert storage.list_tree("files") == []
    with storage._writing("files/ok.jsonl") as target:
        target.write(b"{}\n")
    with storage.open_read("files/ok.jsonl") as handle:
        assert handle.read() == b"{}\n"


def test_an_unreachable_location_says_why():
    nowhere = Storage("s3://ftjobs/x", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(StorageUnavailable, match="cannot be reached"):
        nowhere.check()


def test_readiness_and_submission_with_unreachable_storage(database, settings, admin_key):
    from fastapi.testclient import TestClient

    from service.app import create_app

    unreachable = settings.model_copy(
        update={"storage_url": "s3://ftjobs/nowhere", "s3_endpoint_url": "http://127.0.0.1:9"}
    )
    with TestClient(create_app(unreachable), headers=admin_key.headers) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "cannot be reached" in ready.json()["checks"]["storage"]
        upload = client.post("/v1/files", files={"file": ("d.jsonl", io.BytesIO(b'{"text": "hi"}\n'))})
        assert upload.status_code == 503 and upload.json()["code"] == "storage_unavailable"
        assert upload.headers["retry-after"] and upload.headers["content-type"] == "application/problem+json"
