"""What the server may read, and bounds on every input: each refusal is a 4xx problem with a stable code."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from domain.states import JobStatus
from service.db import transaction
from service.jobs import repository

ROW = {"instruction": "Say hi.", "output": "Hi!"}


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    (data_root / "limits.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(8)) + "\n")
    return "limits.jsonl"


def spec(base_model, dataset: str = "limits.jsonl", **training) -> dict:
    return {
        "base_model": str(base_model),
        "dataset": {"path": dataset},
        "method": "qlora",
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64, **training},
    }


def code_of(response, status: int = 422) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()["code"]


@pytest.fixture()
def planted_model(tmp_path, tiny_model):
    """A directory outside the model roots prepared as the issue describes: a model with a secret planted in
    its tokenizer_config.json."""
    planted = tmp_path / "planted"
    shutil.copytree(tiny_model, planted)
    config = json.loads((planted / "tokenizer_config.json").read_text())
    (planted / "tokenizer_config.json").write_text(json.dumps({**config, "secret": "s3cr3t"}))
    yield planted


def test_base_model_outside_the_roots_is_refused_unread(api, planted_model, dataset, settings, monkeypatch):
    # Any open() of the planted directory would be a read; the refusal must come before one.
    opened = []
    real_open = os.open

    def watching_open(path, *args, **kwargs):
        if str(path).startswith(str(planted_model)):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", watching_open)
    for name in (
        planted_model,
        f"{settings.model_root_dirs[0]}/../../{planted_model}",
        settings.model_root_dirs[0] / ".." / "x",
        "~root",
        "~nosuchuser/m",
        "../planted",
    ):
        for route in ("/v1/jobs", "/v1/plans"):
            assert code_of(api.post(route, json=spec(name, dataset))) == "base_model_not_allowed", name
    assert opened == []


def test_symlink_from_a_root_to_outside_is_refused(api, planted_model, dataset, settings):
    link = settings.model_root_dirs[0] / "link-out"
    link.unlink(missing_ok=True)
    link.symlink_to(planted_model)
    try:
        assert code_of(api.post("/v1/jobs", json=spec(link, dataset))) == "base_model_not_allowed"
        assert code_of(api.post("/v1/jobs", json=spec("link-out", dataset))) == "base_model_not_allowed"
    finally:
        link.unlink()


def test_a_model_under_a_root_is_found_by_absolute_or_relative_name(api, tiny_model, dataset, settings):
    relative = tiny_model.relative_to(settings.model_root_dirs[0])
    for name in (tiny_model, relative):
        plan = api.post("/v1/plans", json=spec(name, dataset))
        assert plan.status_code == 200, plan.text


@pytest.mark.parametrize("name", ["a b/c", "org/na me", "x/" + "y" * 200, "a/b/c/d", "-/-"])
def test_bad_hub_ids_are_a_4xx(api, name, dataset):
    assert code_of(api.post("/v1/jobs", json=spec(name, dataset))) in {"base_model_not_found", "base_model_not_allowed"}


@pytest.mark.parametrize(
    "training, field",
    [
        ({"max_steps": 10**12}, "max_steps"),
        ({"seed": 2**70}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"logging_steps": 10**9}, "logging_steps"),
        ({"checkpoint_every_steps": 10**12}, "checkpoint_every_steps"),
        ({"epochs": 1e9}, "epochs"),
        ({"micro_batch_size": 10**6}, "micro_batch_size"),
        ({"max_seq_length": 10**7}, "max_seq_length"),
        ({"gradient_accumulation_steps": 10**9}, "gradient_accumulation"),
    ],
)
def test_numbers_in_the_spec_are_bounded(api, tiny_model, dataset, training, field):
    response = api.post("/v1/jobs", json=spec(tiny_model, dataset, **training))
    assert code_of(response) == "invalid_spec" and field in response.json()["detail"]


def test_seed_just_below_2_to_32_is_accepted_by_the_planner(api, tiny_model, dataset):
    assert api.post("/v1/plans", json=spec(tiny_model, dataset, seed=2**32 - 1)).status_code == 200


def test_max_seq_length_may_not_exceed_the_models_context(api, tiny_model, dataset):
    context = json.loads((tiny_model / "config.json").read_text())["max_position_embeddings"]
    response = api.post("/v1/jobs", json=spec(tiny_model, dataset, max_seq_length=context * 2))
    assert code_of(response) == "sequence_too_long" and f"context length {context}" in response.json()["detail"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(base_model="/models/a\x00b"),
        lambda s: s.update(dataset={"path": "limits\x00.jsonl"}),
        lambda s: s.update(metadata={"k": "v\x00"}),
        lambda s: s.update(metadata={"k\x00": "v"}),
        lambda s: s.update(metadata={"k": "\ud800"}),
        lambda s: s.update(metadata={"\udfff": "v"}),
        lambda s: s.update(base_model="\u202e/evil"),
    ],
)
def test_nul_bytes_and_odd_unicode_are_a_4xx(api, tiny_model, dataset, mutate):
    body = spec(tiny_model, dataset)
    mutate(body)
    raw = json.dumps(body).encode()  # ASCII escapes, so the lone surrogates reach the server as JSON text
    response = api.post("/v1/jobs", content=raw, headers={"content-type": "application/json"})
    assert code_of(response) in {"invalid_spec", "base_model_not_allowed"}


@pytest.mark.parametrize(
    "path", ["/v1/jobs/job_%00", "/v1/jobs/%00", "/v1/jobs/job_%00/events", "/v1/jobs/" + "a" * 5000]
)
def test_nul_and_odd_ids_in_urls_are_404(api, path):
    assert code_of(api.get(path), 404) == "job_not_found"


def test_nul_in_a_cursor_is_400(api):
    assert code_of(api.get("/v1/jobs", params={"after": "job_\x00"}), 400) == "invalid_cursor"


def test_dataset_rows_and_bytes_are_limited(database, settings, admin_key, tiny_model, data_root):
    from fastapi.testclient import TestClient

    from service.app import create_app

    (data_root / "twenty.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(20)) + "\n")
    few_rows = settings.model_copy(update={"max_dataset_rows": 10})
    few_bytes = settings.model_copy(update={"max_dataset_bytes": 100})
    for limited in (few_rows, few_bytes):
        with TestClient(create_app(limited), headers=admin_key.headers) as client:
            response = client.post("/v1/jobs", json=spec(tiny_model, "twenty.jsonl"))
            assert code_of(response) == "dataset_too_large"
    with TestClient(create_app(few_rows), headers=admin_key.headers) as client:
        rows = ("\n".join(json.dumps(ROW) for _ in range(20)) + "\n").encode()
        upload = client.post("/v1/files", files={"file": ("d.jsonl", rows)}, data={"format": "alpaca"})
        assert code_of(upload) == "dataset_too_large"


def test_an_uploaded_file_is_validated_once(api, store_queued_job, tiny_model, settings, monkeypatch):
    import service.dataset_refs as dataset_refs

    rows = ("\n".join(json.dumps(ROW) for _ in range(6)) + "\n").encode()
    uploaded = api.post("/v1/files", files={"file": ("d.jsonl", rows)}).json()
    assert uploaded["validated_format"] is None
    calls = []
    real = dataset_refs.validate_dataset
    monkeypatch.setattr(dataset_refs, "validate_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    job_spec = {**spec(tiny_model), "dataset": {"file_id": uploaded["id"]}}
    first, second = store_queued_job(job_spec), store_queued_job(job_spec)
    assert len(calls) == 1  # the second submission reused the remembered result
    with transaction() as session:
        assert repository.get_file(session, uploaded["id"]).rows == 6
        for job_id in (first, second):
            repository.transition(session, job_id, JobStatus.cancelled)


def test_a_dataset_by_path_is_read_once_per_version(api, store_queued_job, tiny_model, data_root):
    """The first submission reads every row and records the result; the same file again (same size and mtime)
    is not read at all: corrupted in place behind the service's back, it still passes. A new version is read."""
    from sqlalchemy import select

    from service.models import DatasetValidation

    path = data_root / "read-once.jsonl"
    path.write_text("\n".join(json.dumps(ROW) for _ in range(12)) + "\n")
    first = store_queued_job(spec(tiny_model, "read-once.jsonl"))
    with transaction() as session:
        recorded = session.scalars(select(DatasetValidation).where(DatasetValidation.url.endswith("read-once.jsonl")))
        assert [(row.rows, row.dataset_format) for row in recorded] == [(12, "alpaca")]

    stat = path.stat()
    text = path.read_text()
    corrupted = "#" * len(json.dumps(ROW)) + text[len(json.dumps(ROW)) :]  # same size, first row not JSON
    path.write_text(corrupted)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = store_queued_job(spec(tiny_model, "read-once.jsonl"))  # the recorded result, not a read

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new version: read again
    response = api.post("/v1/jobs", json=spec(tiny_model, "read-once.jsonl"))
    assert code_of(response) == "invalid_dataset" and "line 1" in response.json()["detail"]
    with transaction() as session:
        for job_id in (first, second):
            repository.transition(session, job_id, JobStatus.cancelled)


def test_a_submission_validating_a_large_dataset_outlasts_the_workers_idle_transaction_timeout(
    database, settings, admin_key, tiny_model, data_root
):
    """The submission validates its dataset inside its write unit; the idle-in-transaction timeout that frees a
    frozen worker's locks must not cut it off (it did, once, with a 6 s lease: every retry a 503)."""
    import time

    from fastapi.testclient import TestClient

    from service.app import create_app

    (data_root / "slow-to-read.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(200_000)) + "\n")
    strict = settings.model_copy(update={"idle_in_transaction_seconds": 0.2})
    with TestClient(create_app(strict), headers=admin_key.headers) as client:
        started = time.monotonic()
        response = client.post("/v1/jobs", json=spec(tiny_model, "slow-to-read.jsonl"))
        assert response.status_code == 201, response.text
        assert time.monotonic() - started > 0.2  # the validation took longer than the timeout
        client.post(f"/v1/jobs/{response.json()['id']}/cancel")
