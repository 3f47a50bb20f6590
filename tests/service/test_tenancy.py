"""Keys and tenants against the real PostgreSQL: two tenants' keys and an admin key.

Without a key every /v1 route is 401; another tenant's job or file is 404 on every route, exactly as one that
never existed; lists hold only the caller's own; an admin sees and filters across tenants; a revoked key is
refused; a quota of one active job refuses the second; the rate limit answers 429 with Retry-After.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.db import transaction
from service.jobs import repository

ROW = {"instruction": "Say hi.", "output": "Hi!"}


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    (data_root / "tenancy.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(8)) + "\n")
    return "tenancy.jsonl"


def spec(model_dir, dataset: str, **dataset_ref) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": dataset_ref or {"path": dataset},
        "method": "qlora",
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64},
    }


@pytest.fixture(scope="module")
def keys(make_key):
    return {"alpha": make_key("alpha"), "beta": make_key("beta"), "admin": make_key("ops", admin=True)}


@pytest.fixture()
def client(database, settings):
    with TestClient(create_app(settings)) as plain:  # no default key: each request says whose it is
        yield plain


@pytest.fixture(scope="module")
def alpha_job(keys, settings, tiny_model, dataset) -> str:
    """A queued job of tenant alpha with one artifact on disk, stored without a queue message."""
    from domain.spec import JobSpec
    from service.jobs.service import submit_job

    with transaction() as session:
        job = submit_job(session, settings, JobSpec.model_validate(spec(tiny_model, dataset)), keys["alpha"].caller)
        repository.set_job_fields(session, job.id, artifacts=[{"name": "summary.json", "size_bytes": 2}])
    artifacts = Path(settings.resolved_storage_url) / "jobs" / job.id / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    (artifacts / "summary.json").write_text("{}")
    return job.id


def problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    return response.json()


def job_routes(job_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/artifacts/summary.json"),
        ("GET", f"/v1/jobs/{job_id}/artifacts.tar"),
        ("GET", f"/v1/jobs/{job_id}/checkpoints"),
    ]


def openai_job_routes(job_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
    ]


def openai_error(response, status: int, code: str) -> dict:
    """OpenAI's envelope, which its SDK reads the message from."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


def test_every_v1_route_needs_a_valid_key(client, alpha_job):
    routes = [
        *job_routes(alpha_job),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("POST", "/v1/plans"),
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("GET", "/v1/files/file_" + "0" * 24),
        ("DELETE", "/v1/files/file_" + "0" * 24),
        ("GET", "/v1/files/file_" + "0" * 24 + "/content"),
        ("GET", f"/v1/jobs/{alpha_job}/checkpoints/2/download"),
    ]
    for method, url in routes:
        for headers in ({}, {"Authorization": "Bearer ftj_not-a-key"}, {"Authorization": "Basic abc"}):
            response = client.request(method, url, headers=headers)
            problem(response, 401, "unauthenticated")
            assert response.headers["www-authenticate"] == "Bearer"
    for open_route in ("/healthz", "/readyz", "/metrics"):
        assert client.get(open_route).status_code == 200


def test_another_tenants_job_is_404_on_every_route(client, keys, alpha_job):
    for method, url in job_routes(alpha_job):
        problem(client.request(method, url, headers=keys["beta"].headers), 404, "job_not_found")
        assert client.request(method, url, headers=keys["alpha"].headers).status_code == 200
    # A cursor naming another tenant's job reads as unknown too.
    problem(client.get("/v1/jobs", params={"after": alpha_job}, headers=keys["beta"].headers), 400, "invalid_cursor")
    with transaction() as session:
        job = repository.get_job(session, alpha_job)
    assert job.status == "cancelled" and job.cancelled_by_key_id == keys["alpha"].caller.key_id
    assert job.created_by_key_id == keys["alpha"].caller.key_id and job.tenant_id == keys["alpha"].caller.tenant_id


def test_the_openai_routes_are_tenant_scoped_and_answer_in_openais_envelope(client, keys, alpha_job):
    for method, url in [*openai_job_routes(alpha_job), ("GET", "/v1/fine_tuning/jobs")]:
        error = openai_error(client.request(method, url), 401, "unauthenticated")
        assert error["type"] == "authentication_error"
    for method, url in openai_job_routes(alpha_job):
        openai_error(client.request(method, url, headers=keys["beta"].headers), 404, "job_not_found")
    assert client.get(f"/v1/fine_tuning/jobs/{alpha_job}", headers=keys["alpha"].headers).json()["id"] == alpha_job
    beta_list = client.get("/v1/fine_tuning/jobs", headers=keys["beta"].headers).json()["data"]
    assert alpha_job not in {job["id"] for job in beta_list}
    # /v1/files is shared with native clients: problem+json, carrying OpenAI's envelope as its `error` member.
    missing = problem(client.get("/v1/files/file_" + "0" * 24, headers=keys["beta"].headers), 404, "file_not_found")
    assert missing["error"] == {
        "message": missing["detail"],
        "type": "invalid_request_error",
        "param": None,
        "code": "file_not_found",
    }


def test_another_tenants_file_is_404_on_every_file_route(client, keys):
    uploaded = client.post(
        "/v1/files",
        files={"file": ("d.jsonl", io.BytesIO(b'{"text": "hi"}\n'))},
        data={"purpose": "fine-tune"},
        headers=keys["alpha"].headers,
    ).json()
    assert uploaded["object"] == "file" and uploaded["bytes"] == uploaded["size_bytes"] == 15
    routes = [
        ("GET", f"/v1/files/{uploaded['id']}"),
        ("GET", f"/v1/files/{uploaded['id']}/content"),
        ("DELETE", f"/v1/files/{uploaded['id']}"),
    ]
    for method, url in routes:
        problem(client.request(method, url, headers=keys["beta"].headers), 404, "file_not_found")
    assert uploaded["id"] not in {f["id"] for f in client.get("/v1/files", headers=keys["beta"].headers).json()["data"]}
    assert client.get(routes[1][1], headers=keys["alpha"].headers).content == b'{"text": "hi"}\n'
    assert client.delete(routes[2][1], headers=keys["alpha"].headers).json()["deleted"] is True
    problem(client.get(routes[0][1], headers=keys["alpha"].headers), 404, "file_not_found")


def test_lists_show_only_the_callers_own_and_admins_see_all(
    client, keys, alpha_job, store_queued_job, tiny_model, dataset
):
    beta_ids = {item["id"] for item in client.get("/v1/jobs", headers=keys["beta"].headers).json()["data"]}
    alpha_ids = {item["id"] for item in client.get("/v1/jobs", headers=keys["alpha"].headers).json()["data"]}
    assert alpha_job in alpha_ids and alpha_job not in beta_ids
    admin_job = store_queued_job(spec(tiny_model, dataset))  # the shared admin key's tenant
    everything = client.get("/v1/jobs", params={"limit": 200}, headers=keys["admin"].headers).json()["data"]
    assert {alpha_job, admin_job} <= {item["id"] for item in everything}
    only_alpha = client.get("/v1/jobs", params={"tenant": "alpha"}, headers=keys["admin"].headers).json()["data"]
    assert {item["id"] for item in only_alpha} == alpha_ids
    # The tenant filter is an admin's: for anyone else it changes nothing.
    assert admin_job not in {
        i["id"]
        for i in client.get("/v1/jobs", params={"tenant": "test-admins"}, headers=keys["beta"].headers).json()["data"]
    }
    assert client.get(f"/v1/jobs/{alpha_job}", headers=keys["admin"].headers).status_code == 200
    assert client.get(f"/v1/jobs/{alpha_job}/artifacts/summary.json", headers=keys["admin"].headers).content == b"{}"


def test_another_tenants_file_cannot_be_used_in_a_job(client, keys, tiny_model, dataset):
    rows = ("\n".join(json.dumps(ROW) for _ in range(4)) + "\n").encode()
    uploaded = client.post(
        "/v1/files",
        files={"file": ("d.jsonl", io.BytesIO(rows))},
        data={"format": "alpaca"},
        headers=keys["alpha"].headers,
    ).json()
    assert uploaded["rows"] == 4 and uploaded["validated_format"] == "alpaca"
    refused = client.post(
        "/v1/jobs", json=spec(tiny_model, dataset, file_id=uploaded["id"]), headers=keys["beta"].headers
    )
    problem(refused, 422, "dataset_not_found")
    assert "another tenant" not in refused.text
    # Nor read, listed or deleted by it: as missing as a file that never existed.
    for method in ("GET", "DELETE"):
        problem(
            client.request(method, f"/v1/files/{uploaded['id']}", headers=keys["beta"].headers), 404, "file_not_found"
        )
    assert uploaded["id"] not in {
        f["id"] for f in client.get("/v1/files", params={"limit": 200}, headers=keys["beta"].headers).json()["data"]
    }
    assert client.get(f"/v1/files/{uploaded['id']}", headers=keys["alpha"].headers).json() == uploaded
    assert client.delete(f"/v1/files/{uploaded['id']}", headers=keys["alpha"].headers).status_code == 200
    problem(client.get(f"/v1/files/{uploaded['id']}", headers=keys["alpha"].headers), 404, "file_not_found")


def test_revoked_key_is_refused(client, make_key):
    from service.tenancy.keys import revoke_key

    key = make_key("alpha")
    assert client.get("/v1/jobs", headers=key.headers).status_code == 200
    with transaction() as session:
        revoke_key(session, key.caller.key_id)
    problem(client.get("/v1/jobs", headers=key.headers), 401, "unauthenticated")


def test_a_quota_of_one_active_job_refuses_the_second(client, make_key, tiny_model, dataset):
    key = make_key("gamma", max_active_jobs=1)
    first = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers)
    assert first.status_code == 201, first.text
    second = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers)
    assert problem(second, 429, "quota_exceeded")["max_active_jobs"] == 1
    # Ended, the first no longer counts. A worker of this session may have claimed it already: then it
    # is cancelling until the worker stops it, and still counts until then.
    client.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=key.headers)
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{first.json()['id']}", headers=key.headers).json()["status"] not in {
        "cancelled",
        "succeeded",
        "failed",
    }:  # a fast worker may even have finished it
        assert time.monotonic() < deadline, "the first job never ended"
        time.sleep(0.3)
    third = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=key.headers)
    assert third.status_code == 201, third.text
    client.post(f"/v1/jobs/{third.json()['id']}/cancel", headers=key.headers)


def test_rate_limit_answers_429_with_retry_after(settings, make_key):
    limited = settings.model_copy(update={"rate_limit_requests": 3, "rate_limit_window_seconds": 30})
    key, other = make_key("delta"), make_key("delta")
    with TestClient(create_app(limited)) as client:
        statuses = [client.get("/v1/jobs", headers=key.headers).status_code for _ in range(5)]
        refused = client.get("/v1/jobs", headers=key.headers)
        assert client.get("/v1/jobs", headers=other.headers).status_code == 200  # the limit is per key
    assert statuses[:3] == [200, 200, 200] or statuses.count(429) >= 2  # a window may roll over mid-test
    body = problem(refused, 429, "rate_limited")
    assert 1 <= int(refused.headers["retry-after"]) <= 30 and body["retry_after_seconds"] >= 1


def test_keys_are_random_shown_once_and_stored_as_a_hash(make_key):
    from sqlalchemy import select

    from service.models import ApiKey

    key = make_key("epsilon")
    assert key.secret.startswith("ftj_") and len(key.secret) >= 4 + 43  # 32 random bytes, base64url
    with transaction() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.id == key.caller.key_id))
    assert key.secret not in {row.key_sha256, row.id} and len(row.key_sha256) == 64
