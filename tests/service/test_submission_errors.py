"""Bad input is refused with a 4xx problem+json carrying a stable code, and nothing is stored half-way."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from service.db import transaction
from service.models import Job, UploadedFile


def tiny_spec(model_dir, **overrides) -> dict:
    spec = {
        "base_model": str(model_dir),
        "dataset": {"path": "valid.jsonl"},
        "method": "qlora",
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64},
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def datasets(data_root):
    good = {"instruction": "Say hi.", "output": "Hi!"}
    (data_root / "valid.jsonl").write_text("\n".join(json.dumps(good) for _ in range(8)) + "\n")
    rows = [json.dumps(good), json.dumps(good), '{"instruction": "no output here"}', json.dumps(good)]
    (data_root / "bad-row.jsonl").write_text("\n".join(rows) + "\n")
    return data_root


def stored_counts() -> tuple[int, int]:
    with transaction() as session:
        return session.scalar(select(func.count(Job.seq))), session.scalar(select(func.count(UploadedFile.id)))


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["status"] == status and body["title"] and body["detail"]
    return body


@pytest.fixture()
def nothing_stored(api):
    before = stored_counts()
    yield
    assert stored_counts() == before


def test_unknown_field_is_rejected(api, tiny_model, datasets, nothing_stored):
    body = assert_problem(api.post("/v1/jobs", json=tiny_spec(tiny_model, learning_rte=1e-4)), 422, "invalid_spec")
    assert "learning_rte" in body["detail"]
    nested = tiny_spec(tiny_model, memory={"optimiser": "adamw"})
    assert "optimiser" in assert_problem(api.post("/v1/jobs", json=nested), 422, "invalid_spec")["detail"]


def test_options_of_another_method_are_rejected(api, tiny_model, datasets, nothing_stored):
    spec = tiny_spec(tiny_model, method="full", quantization={"bits": 4})
    assert "qlora only" in assert_problem(api.post("/v1/jobs", json=spec), 422, "invalid_spec")["detail"]


def test_missing_base_model(api, settings, datasets, nothing_stored):
    spec = tiny_spec(settings.model_root_dirs[0] / "no-such-model")
    assert_problem(api.post("/v1/jobs", json=spec), 422, "base_model_not_found")
    assert_problem(api.post("/v1/jobs", json=tiny_spec("no-such-model")), 422, "base_model_not_found")
    uncached_hub_id = tiny_spec("nobody/not-a-cached-model")
    assert_problem(api.post("/v1/jobs", json=uncached_hub_id), 422, "base_model_not_found")


def test_malformed_dataset_row_reports_its_line(api, tiny_model, datasets, nothing_stored):
    spec = tiny_spec(tiny_model, dataset={"path": "bad-row.jsonl"})
    body = assert_problem(api.post("/v1/jobs", json=spec), 422, "invalid_dataset")
    assert body["line"] == 3 and "line 3" in body["detail"]


@pytest.mark.parametrize("path", ["../outside.jsonl", "/etc/hostname", "sub/../../outside.jsonl"])
def test_dataset_path_may_not_leave_the_data_root(api, tiny_model, datasets, nothing_stored, path):
    (datasets.parent / "outside.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    spec = tiny_spec(tiny_model, dataset={"path": path})
    assert_problem(api.post("/v1/jobs", json=spec), 422, "dataset_path_escapes_root")


def test_symlink_out_of_the_data_root_is_refused(api, tiny_model, datasets, nothing_stored, tmp_path):
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"instruction": "a", "output": "b"}\n')
    link = datasets / "link.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    spec = tiny_spec(tiny_model, dataset={"path": "link.jsonl"})
    assert_problem(api.post("/v1/jobs", json=spec), 422, "dataset_path_escapes_root")


def test_unknown_file_id(api, tiny_model, datasets, nothing_stored):
    spec = tiny_spec(tiny_model, dataset={"file_id": "file_doesnotexist0"})
    assert_problem(api.post("/v1/jobs", json=spec), 422, "dataset_not_found")


def test_oversized_upload_is_refused(database, settings, admin_key, nothing_stored):
    from fastapi.testclient import TestClient

    from service.app import create_app

    small = settings.model_copy(update={"max_upload_bytes": 1024})
    stored = Path(settings.resolved_storage_url) / "files"
    stored_before = set(stored.glob("*"))
    with TestClient(create_app(small), headers=admin_key.headers) as client:
        big = b'{"text": "' + b"x" * 200_000 + b'"}\n'
        response = client.post("/v1/files", files={"file": ("big.jsonl", big)})
        assert_problem(response, 413, "upload_too_large")

        # Without a Content-Length the limit still holds while streaming to disk.
        def chunks():
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
            for _ in range(20):
                yield b"x" * 10_000
            yield b"\r\n--b--\r\n"

        response = client.post(
            "/v1/files", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert_problem(response, 413, "upload_too_large")
    assert not list(settings.resolved_home.glob(".upload-*"))  # no spool left behind
    assert set(stored.glob("*")) == stored_before  # and nothing stored


def test_upload_with_format_validates_rows(api, nothing_stored):
    rows = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"oops": 1}\n'
    response = api.post("/v1/files", files={"file": ("d.jsonl", io.BytesIO(rows))}, data={"format": "messages"})
    assert assert_problem(response, 422, "invalid_dataset")["line"] == 2


def test_unknown_job_is_404(api):
    assert_problem(api.get("/v1/jobs/job_missing"), 404, "job_not_found")
    assert_problem(api.post("/v1/jobs/job_missing/cancel"), 404, "job_not_found")
