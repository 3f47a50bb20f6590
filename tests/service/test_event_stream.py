"""GET /v1/jobs/{id}/events as Server-Sent Events from the API under uvicorn: read part of a stream, hang up,
reconnect with Last-Event-ID, and get exactly the newer events, in order, until the stream ends with the job."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from service.db import transaction
from service.jobs import repository

ROW = {"instruction": "Say hi.", "output": "Hi!"}
STREAM = {"Accept": "text/event-stream"}


@pytest.fixture(scope="module")
def dataset(data_root) -> str:
    (data_root / "stream.jsonl").write_text("\n".join(json.dumps(ROW) for _ in range(8)) + "\n")
    return "stream.jsonl"


def spec(model_dir, dataset: str) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "qlora",
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64},
    }


def add_progress(job_id: str, *steps: int) -> None:
    with transaction() as session:
        for step in steps:
            repository.add_event(session, job_id, "progress", {"step": step, "total_steps": 10})


def messages(response: httpx.Response):
    """SSE messages as dicts of their fields; comment lines (pings) skipped."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def test_a_stream_resumes_after_last_event_id_and_ends_with_the_job(
    uvicorn_api, make_key, tiny_model, dataset, redis_client
):
    key = make_key("streams", max_active_jobs=10)
    # A queue no worker consumes: the session's worker would otherwise run the job and write events of its own.
    queue = f"streams-{uuid.uuid4().hex[:8]}"
    with (
        uvicorn_api(FTJOBS_SSE_POLL_SECONDS="0.1", FTJOBS_QUEUE_NAME=queue) as (url, _),
        httpx.Client(base_url=url, headers=key.headers, timeout=30) as client,
    ):
        job_id = client.post("/v1/jobs", json=spec(tiny_model, dataset)).json()["id"]
        add_progress(job_id, 1, 2)
        seen = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=STREAM) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            for message in messages(response):
                seen.append(message)
                if len(seen) == 2:
                    break  # hang up mid-stream
        assert [m["event"] for m in seen] == ["state", "progress"]
        assert json.loads(seen[0]["data"])["data"]["status"] == "queued"
        assert int(seen[1]["id"]) == json.loads(seen[1]["data"])["seq"]

        add_progress(job_id, 3, 4)  # written while nobody listens
        resumed = []
        with client.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={**STREAM, "Last-Event-ID": seen[1]["id"]}
        ) as response:
            for message in messages(response):
                resumed.append(message)
                if len(resumed) == 3:  # the rest arrive live: two more steps, then the job ends
                    add_progress(job_id, 5)
                    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        # The loop above ended because the server closed the stream (else the read would time out): the job ended.

        every = client.get(f"/v1/jobs/{job_id}/events").json()["data"]  # JSON pages, as before, without the Accept
        assert [int(m["id"]) for m in seen + resumed] == [event["seq"] for event in every]
        assert [json.loads(m["data"]) for m in seen + resumed] == every
        assert every[-1]["data"]["status"] == "cancelled"
        assert [e["data"].get("step") for e in every if e["kind"] == "progress"] == [1, 2, 3, 4, 5]
    redis_client.delete(queue)


def test_a_stream_of_another_tenants_job_is_a_404(uvicorn_api, make_key, tiny_model, dataset):
    owner, stranger = make_key("streams-owner"), make_key("streams-stranger")
    with uvicorn_api() as (url, _):
        job_id = httpx.post(f"{url}/v1/jobs", json=spec(tiny_model, dataset), headers=owner.headers, timeout=30).json()[
            "id"
        ]
        response = httpx.get(f"{url}/v1/jobs/{job_id}/events", headers={**stranger.headers, **STREAM}, timeout=30)
    assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"


def test_the_stream_is_declared_in_openapi(settings):
    from service.app import create_app

    operation = create_app(settings).openapi()["paths"]["/v1/jobs/{job_id}/events"]["get"]
    assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert {"name": "last-event-id", "in": "header"}.items() <= next(
        p for p in operation["parameters"] if p["in"] == "header"
    ).items()
