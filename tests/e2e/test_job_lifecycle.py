"""The whole path: API → Redis → Celery worker → spawned training process → real CPU training → artifacts."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def instructions(data_root):
    rows = [{"instruction": f"Repeat the word number {i}.", "output": f"word {i} word {i}"} for i in range(24)]
    (data_root / "e2e.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return "e2e.jsonl"


def qlora_spec(model_dir, dataset: str, max_steps: int) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "qlora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": max_steps, "micro_batch_size": 2, "max_seq_length": 64, "learning_rate": 1e-3},
        "memory": {"optimizer": "paged_adamw_8bit"},
        "metadata": {"test": "e2e"},
    }


def test_job_trains_to_success_and_serves_its_adapter(api, worker, tiny_model, instructions, wait_for_status, tmp_path):
    response = api.post("/v1/jobs", json=qlora_spec(tiny_model, instructions, max_steps=3))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["predicted_peak_bytes"] > 0

    job = wait_for_status(job["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == job["progress"]["total_steps"] == 3
    # What a real worker stored is the Progress the API declares, no field more or less (extra is forbidden)
    from service.schemas import Progress

    assert Progress.model_validate(job["progress"]).model_dump(exclude_unset=True) == job["progress"]
    assert job["started_at"] and job["finished_at"] and job["error"] is None

    names = {artifact["name"] for artifact in job["artifacts"]}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= names
    download = api.get(f"/v1/jobs/{job['id']}/artifacts/adapter/adapter_model.safetensors")
    assert download.status_code == 200
    (tmp_path / "adapter.safetensors").write_bytes(download.content)
    tensors = load_file(tmp_path / "adapter.safetensors")
    assert any("lora_A" in name for name in tensors) and any("lora_B" in name for name in tensors)
    assert api.get(f"/v1/jobs/{job['id']}/artifacts/../../etc/passwd").status_code == 404

    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    states = [e["data"]["status"] for e in events if e["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    assert [e["data"]["step"] for e in events if e["kind"] == "progress"] == [1, 2, 3]
    newer = api.get(f"/v1/jobs/{job['id']}/events", params={"after": events[-1]["seq"]}).json()
    assert newer["data"] == [] and newer["next_cursor"] == events[-1]["seq"]


def test_cancelling_a_running_job_stops_its_training_process(
    api, worker, tiny_model, instructions, wait_for_status, settings
):
    job = api.post("/v1/jobs", json=qlora_spec(tiny_model, instructions, max_steps=100_000)).json()
    wait_for_status(job["id"], {"running"})
    # Wait for real training progress so the cancel lands mid-training, not during start-up.
    _wait_for_progress(api, job["id"])
    from service.db import transaction
    from service.jobs.repository import get_job

    with transaction() as session:
        child_pid = get_job(session, job["id"]).child_pid
    assert child_pid and _alive(child_pid)

    response = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelling"
    final = wait_for_status(job["id"], {"cancelled", "failed", "succeeded"}, timeout_seconds=60)
    assert final["status"] == "cancelled"
    assert not _alive(child_pid)
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["code"] == "invalid_transition"


def test_a_cancelled_queued_job_is_never_run_even_if_its_message_arrives(
    api, worker, tiny_model, instructions, store_queued_job
):
    from service.queue import enqueue_job

    job_id = store_queued_job(qlora_spec(tiny_model, instructions, max_steps=1))
    cancelled = api.post(f"/v1/jobs/{job_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"]
    enqueue_job(job_id)
    wait_for_log(worker, f"job {job_id} is not queued any more")
    states = [e["data"]["status"] for e in api.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    assert states == ["queued", "cancelled"]


def test_a_redelivered_message_does_not_start_the_job_twice(
    api, worker, tiny_model, instructions, store_queued_job, wait_for_status
):
    from service.queue import enqueue_job

    job_id = store_queued_job(qlora_spec(tiny_model, instructions, max_steps=2))
    enqueue_job(job_id)
    enqueue_job(job_id)  # what Redis does when a message outlives its visibility timeout
    job = wait_for_status(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    wait_for_log(worker, f"job {job_id} is not queued any more")
    states = [e["data"]["status"] for e in api.get(f"/v1/jobs/{job_id}/events").json()["data"] if e["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]


def test_listing_filters_by_status_and_pages_with_a_cursor(api, tiny_model, instructions, store_queued_job):
    ids = [store_queued_job(qlora_spec(tiny_model, instructions, max_steps=1)) for _ in range(3)]
    for job_id in ids:
        assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    first = api.get("/v1/jobs", params={"status": "cancelled", "limit": 2}).json()
    assert len(first["data"]) == 2 and first["next_cursor"] == first["data"][-1]["id"]
    assert all(job["status"] == "cancelled" for job in first["data"])
    rest = api.get("/v1/jobs", params={"status": "cancelled", "limit": 200, "after": first["next_cursor"]}).json()
    seen = [job["id"] for job in first["data"] + rest["data"]]
    assert len(seen) == len(set(seen)) and set(ids) <= set(seen)
    assert rest["next_cursor"] is None
    assert api.get("/v1/jobs", params={"after": "job_nope"}).json()["code"] == "invalid_cursor"


def wait_for_log(worker, text: str, timeout_seconds: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout_seconds
    while not any(text in line for line in worker.lines):
        assert time.monotonic() < deadline, f"the worker never logged {text!r}"
        time.sleep(0.2)


def _wait_for_progress(api, job_id: str, timeout_seconds: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout_seconds
    while not (api.get(f"/v1/jobs/{job_id}").json().get("progress") or {}).get("step"):
        assert time.monotonic() < deadline, "the job never reported progress"
        time.sleep(0.3)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited, which is what matters here.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split()[2] != "Z"
