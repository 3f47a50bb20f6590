"""Idempotency-Key on every POST, against the real PostgreSQL: the first answer replays (across an API restart
too), another body with the same key is refused, tenants have their own keys, two requests at once never make two
jobs, and keys past their time are pruned."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from service.app import create_app
from service.db import transaction
from service.models import IdempotencyKey, Job

ROW = {"instruction": "Say hi.", "output": "Hi!"}


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    (data_root / "idempotency.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(8)) + "\n")
    return "idempotency.jsonl"


@pytest.fixture(scope="module")
def keys(make_key):
    return {"alpha": make_key("idem-alpha", max_active_jobs=100), "beta": make_key("idem-beta", max_active_jobs=100)}


@pytest.fixture()
def client(database, settings):
    with TestClient(create_app(settings)) as plain:
        yield plain


def spec(model_dir, dataset: str, max_steps: int = 2) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "qlora",
        "training": {"max_steps": max_steps, "micro_batch_size": 2, "max_seq_length": 64},
    }


def headers(key, idempotency_key: str) -> dict[str, str]:
    return {**key.headers, "Idempotency-Key": idempotency_key}


def jobs_of(tenant_id: str) -> int:
    with transaction() as session:
        return session.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id))


def test_a_replayed_submission_returns_the_first_answer_and_makes_no_second_job(client, keys, tiny_model, dataset):
    alpha, key = keys["alpha"], str(uuid.uuid4())
    before = jobs_of(alpha.caller.tenant_id)
    first = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key))
    assert first.status_code == 201, first.text
    again = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key))
    assert again.status_code == 201 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert jobs_of(alpha.caller.tenant_id) == before + 1
    # Recorded with the job, in its transaction: the row holds the answer the route gave.
    with transaction() as session:
        row = session.get(IdempotencyKey, (alpha.caller.tenant_id, key))
        assert row.status_code == 201 and json.loads(row.response_body)["id"] == first.json()["id"]


def test_the_same_key_with_another_body_is_refused(client, keys, tiny_model, dataset):
    alpha, key = keys["alpha"], str(uuid.uuid4())
    assert client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key)).status_code == 201
    reused = client.post("/v1/jobs", json=spec(tiny_model, dataset, max_steps=3), headers=headers(alpha, key))
    assert reused.status_code == 422 and reused.headers["content-type"] == "application/problem+json"
    assert reused.json()["code"] == "idempotency_key_reused"
    elsewhere = client.post("/v1/plans", json=spec(tiny_model, dataset), headers=headers(alpha, key))
    assert elsewhere.json()["code"] == "idempotency_key_reused"  # another route is another request


def test_tenants_have_their_own_keys(client, keys, tiny_model, dataset):
    key = str(uuid.uuid4())
    ids = {
        name: client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(keys[name], key)).json()["id"]
        for name in ("alpha", "beta")
    }
    assert ids["alpha"] != ids["beta"]
    beta_job = client.get(f"/v1/jobs/{ids['beta']}", headers=keys["beta"].headers).json()
    assert beta_job["tenant_id"] == keys["beta"].caller.tenant_id


def test_other_posts_replay_their_answer_too(client, keys, tiny_model, dataset):
    alpha, key = keys["alpha"], str(uuid.uuid4())
    job_id = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=alpha.headers).json()["id"]
    first = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers(alpha, key))
    assert first.status_code == 200 and first.json()["status"] == "cancelled"
    # Without the key a second cancel is a 409; with it, the first answer.
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alpha.headers).status_code == 409
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers(alpha, key))
    assert (again.status_code, again.json()) == (200, first.json())
    # A 4xx is an answer as well: the same refusal again, never a run.
    refused_key = str(uuid.uuid4())
    refused = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers(alpha, refused_key))
    replayed = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers(alpha, refused_key))
    assert refused.status_code == replayed.status_code == 409 and replayed.headers["idempotent-replayed"] == "true"


def test_an_invalid_key_is_a_400(client, keys, tiny_model, dataset):
    response = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(keys["alpha"], "x" * 256))
    assert response.status_code == 400 and response.json()["code"] == "invalid_idempotency_key"


def test_a_replay_survives_an_api_restart(uvicorn_api, keys, tiny_model, dataset):
    alpha, key = keys["alpha"], str(uuid.uuid4())
    with uvicorn_api() as (url, _):
        first = httpx.post(f"{url}/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key), timeout=30)
        assert first.status_code == 201, first.text
    with uvicorn_api() as (url, _):
        again = httpx.post(f"{url}/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key), timeout=30)
    assert again.status_code == 201 and again.json() == first.json()


def test_concurrent_requests_with_one_key_make_one_job(uvicorn_api, keys, tiny_model, dataset):
    beta, key = keys["beta"], str(uuid.uuid4())
    before = jobs_of(beta.caller.tenant_id)
    with uvicorn_api() as (url, _), ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda _: httpx.post(
                    f"{url}/v1/jobs", json=spec(tiny_model, dataset), headers=headers(beta, key), timeout=30
                ),
                range(8),
            )
        )
    assert jobs_of(beta.caller.tenant_id) == before + 1
    created = {answer.json()["id"] for answer in answers if answer.status_code == 201}
    assert len(created) == 1
    assert {answer.status_code for answer in answers} <= {201, 409}
    assert all(a.json()["code"] == "idempotency_key_in_use" for a in answers if a.status_code == 409)


def test_keys_past_their_time_are_pruned_and_then_new(client, keys, tiny_model, dataset, settings):
    from service.jobs.reconcile import prune_idempotency_keys

    alpha, key = keys["alpha"], str(uuid.uuid4())
    first = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key)).json()
    with transaction() as session:  # a day and a bit later
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == key)
            .values(created_at=IdempotencyKey.created_at - timedelta(hours=25))
        )
    # Past its time, the key is new again even before it is pruned.
    second = client.post("/v1/jobs", json=spec(tiny_model, dataset), headers=headers(alpha, key)).json()
    assert second["id"] != first["id"]
    with transaction() as session:
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == key)
            .values(created_at=IdempotencyKey.created_at - timedelta(hours=25))
        )
    assert prune_idempotency_keys(settings) >= 1
    with transaction() as session:
        assert session.get(IdempotencyKey, (alpha.caller.tenant_id, key)) is None


def test_an_upload_retried_with_a_fresh_multipart_boundary_replays(client, keys):
    alpha, key = keys["alpha"], str(uuid.uuid4())
    rows = ("\n".join(json.dumps(ROW) for _ in range(4)) + "\n").encode()

    def upload(boundary: str, content: bytes = rows):
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="format"\r\n\r\nalpaca\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="d.jsonl"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + content
        body += f"\r\n--{boundary}--\r\n".encode()
        return client.post(
            "/v1/files",
            content=body,
            headers={**headers(alpha, key), "Content-Type": f"multipart/form-data; boundary={boundary}"},
        )

    first = upload(uuid.uuid4().hex)
    assert first.status_code == 201, first.text
    again = upload(uuid.uuid4().hex)  # as a client's retry builds it: the same parts, another boundary
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert upload(uuid.uuid4().hex, rows + rows).json()["code"] == "idempotency_key_reused"


def test_a_replay_answers_as_the_first_time_even_after_the_file_is_deleted(client, keys):
    """The key promises the first answer, not a fresh look: after a delete the replay still names the file,
    which is gone (what schemathesis's reused keys run into: tests/contract/schemathesis.toml)."""
    alpha, key = keys["alpha"], str(uuid.uuid4())
    rows = ("\n".join(json.dumps(ROW) for _ in range(4)) + "\n").encode()

    def upload():
        return client.post(
            "/v1/files", files={"file": ("d.jsonl", rows)}, data={"format": "alpaca"}, headers=headers(alpha, key)
        )

    first = upload()
    assert first.status_code == 201, first.text
    file_id = first.json()["id"]
    assert client.delete(f"/v1/files/{file_id}", headers=alpha.headers).status_code == 200
    again = upload()
    assert again.status_code == 201 and again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert client.get(f"/v1/files/{file_id}", headers=alpha.headers).json()["code"] == "file_not_found"


def test_each_request_counts_once_against_the_rate_limit_replays_included(settings, make_key):
    limited = settings.model_copy(update={"rate_limit_requests": 4, "rate_limit_window_seconds": 3600})
    key = make_key(f"idem-limited-{uuid.uuid4().hex[:6]}")
    body = {"base_model": "no-such-model", "training": {"max_steps": 1}}
    with TestClient(create_app(limited)) as limited_client:
        statuses = [
            limited_client.post("/v1/plans", json=body, headers=headers(key, name)).status_code
            for name in ("first", "first", "second", "second", "third")
        ]
    # Counted twice (by the layer and by the route), the third request would have been refused.
    assert 429 not in statuses[:4] and statuses[4] == 429


def test_a_replay_carries_cors_headers_for_a_browser(settings, keys):
    browser = settings.model_copy(update={"cors_origins": "https://app.example"})
    alpha, key = keys["alpha"], str(uuid.uuid4())
    sent = {**headers(alpha, key), "Origin": "https://app.example"}
    body = {"base_model": "no-such-model", "training": {"max_steps": 1}}
    with TestClient(create_app(browser)) as browser_client:
        browser_client.post("/v1/plans", json=body, headers=sent)
        replayed = browser_client.post("/v1/plans", json=body, headers=sent)
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.headers["access-control-allow-origin"] == "https://app.example"
    assert "idempotent-replayed" in replayed.headers["access-control-expose-headers"].lower()


def test_on_the_openai_routes_a_refusal_is_in_openais_envelope(client, keys):
    alpha, key = keys["alpha"], str(uuid.uuid4())
    first = {"model": "no-such-model", "training_file": "file-none"}
    client.post("/v1/fine_tuning/jobs", json=first, headers=headers(alpha, key))
    reused = client.post("/v1/fine_tuning/jobs", json={**first, "seed": 7}, headers=headers(alpha, key))
    assert reused.status_code == 422 and reused.headers["content-type"] == "application/json"
    assert reused.json()["error"]["code"] == "idempotency_key_reused" and reused.json()["error"]["message"]
