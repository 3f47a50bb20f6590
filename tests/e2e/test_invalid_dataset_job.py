"""A dataset that turns malformed after submission fails its job in the worker's validation stage:
error.code invalid_dataset with the line number, before any model is loaded or step is trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

VALID_ROW = {
    "alpaca": {"instruction": "Say hi.", "output": "Hi!"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi!"}]},
    "messages": {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
    "text": {"text": "Hi there."},
}
BROKEN_ROW = {
    "alpaca": {"instruction": "No output field."},
    "sharegpt": {"conversations": [{"from": "narrator", "value": "Who am I?"}]},
    "messages": {"messages": "not a list"},
    "text": {"text": 42},
}


@pytest.mark.parametrize("dataset_format", sorted(VALID_ROW))
def test_malformed_row_fails_the_job_with_its_line(
    api, worker, tiny_model, data_root, store_queued_job, wait_for_status, settings, dataset_format
):
    from service.queue import enqueue_job

    path = data_root / f"changes-{dataset_format}.jsonl"
    good = json.dumps(VALID_ROW[dataset_format])
    path.write_text("\n".join([good] * 4) + "\n")
    job_id = store_queued_job(
        {
            "base_model": str(tiny_model),
            "dataset": {"path": path.name},
            "dataset_format": dataset_format,
            "method": "qlora",
            "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64},
        }
    )
    # The file is replaced after the API validated it, as a shared dataset directory allows.
    path.write_text("\n".join([good, good, json.dumps(BROKEN_ROW[dataset_format]), good]) + "\n")
    enqueue_job(job_id)

    job = wait_for_status(job_id, {"succeeded", "failed", "cancelled"}, timeout_seconds=120)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_dataset"
    assert job["error"]["message"].startswith("line 3:")
    events = api.get(f"/v1/jobs/{job_id}/events").json()["data"]
    assert not [e for e in events if e["kind"] == "progress"]
    assert [(a["number"], a["outcome"]) for a in job["attempts"]] == [(1, "failed")]  # bad data is not retried
    assert not (Path(settings.resolved_storage_url) / "jobs" / job_id / "artifacts").exists()
