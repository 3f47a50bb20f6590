"""A training process SIGKILLed mid-job (what the kernel's OOM killer does) ends its attempt; the job goes back
to the queue as a new attempt that resumes from its last checkpoint in storage, and ends with the adapter an
uninterrupted run produces."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load

# The resumed run restores the adapter weights, the optimizer state (bitsandbytes' 8-bit path), the LR
# schedule, the RNG states and the data position exactly, in the same worker with the same CPU thread count,
# so it is expected to be bit-identical to an uninterrupted run (tests/worker/test_checkpoint.py asserts
# equality in-process). The tolerance only leaves room for a reordered fp32 reduction across processes: a
# resume that lost the optimizer moments or replayed a batch moves these ~1e-2 weights by far more.
MAX_ABS_DIFF = 1e-6


@pytest.fixture(scope="module")
def resume_dataset(data_root):
    rows = [{"instruction": f"Count to {i}.", "output": " ".join(str(n) for n in range(i + 1))} for i in range(24)]
    (data_root / "resume.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return "resume.jsonl"


def checkpointed_spec(model_dir, dataset: str) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "qlora",
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "max_steps": 60,
            "micro_batch_size": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-3,
            "seed": 3,
            "checkpoint_every_steps": 5,
            "keep_checkpoints": 2,
            "logging_steps": 5,
        },
        "memory": {"optimizer": "paged_adamw_8bit"},
    }


def test_a_killed_training_process_is_retried_and_resumes_from_its_last_checkpoint(
    api, worker, tiny_model, resume_dataset, wait_for_status
):
    spec = checkpointed_spec(tiny_model, resume_dataset)
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    first_checkpoint = wait_for_event(api, job_id, "checkpoint")
    killed_pid = child_pid(job_id)
    os.kill(killed_pid, signal.SIGKILL)

    job = wait_for_status(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert not [a for a in job["artifacts"] if a["name"].startswith("checkpoints")]
    assert child_pid(job_id) != killed_pid  # the row names the process that finished the job

    events = all_events(api, job_id)
    first, second = job["attempts"]
    assert (first["number"], first["outcome"], first["resumed_from_step"]) == (1, "crashed", None)
    assert first["detail"] == f"the training process exited with code -{signal.SIGKILL} without a result"
    assert (second["number"], second["outcome"]) == (2, "succeeded")
    resumed = [e["data"] for e in events if e["kind"] == "log" and e["data"]["message"].startswith("resumed")]
    assert len(resumed) == 1 and resumed[0]["message"] == f"resumed from step {resumed[0]['step']}"
    assert resumed[0]["step"] == second["resumed_from_step"] >= first_checkpoint["data"]["step"] > 0
    assert (
        first_checkpoint["data"]["path"] == f"jobs/{job_id}/checkpoints/a1-step-{first_checkpoint['data']['step']:06d}"
    )
    assert [e["data"]["status"] for e in events if e["kind"] == "state"] == [
        "queued",
        "running",
        "queued",
        "running",
        "succeeded",
    ]

    reference_id = api.post("/v1/jobs", json=spec).json()["id"]
    reference = wait_for_status(reference_id, {"succeeded", "failed", "cancelled"})
    assert reference["status"] == "succeeded", reference["error"]
    resumed_adapter, straight_adapter = (adapter(api, some_id) for some_id in (job_id, reference_id))
    assert resumed_adapter.keys() == straight_adapter.keys()
    max_abs_diff = max((resumed_adapter[name] - straight_adapter[name]).abs().max().item() for name in resumed_adapter)
    print(f"resumed from step {resumed[0]['step']}: adapter max abs diff {max_abs_diff:.3g}")
    assert max_abs_diff <= MAX_ABS_DIFF
    assert any((tensor.abs() > 0).any() for name, tensor in straight_adapter.items() if "lora_B" in name)


def adapter(api, job_id: str) -> dict[str, torch.Tensor]:
    response = api.get(f"/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors")
    assert response.status_code == 200
    return load(response.content)


def child_pid(job_id: str) -> int:
    from service.db import transaction
    from service.jobs.repository import get_job

    with transaction() as session:
        return get_job(session, job_id).child_pid


def all_events(api, job_id: str) -> list[dict]:
    events, after = [], 0
    while page := api.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000}).json()["data"]:
        events += page
        after = page[-1]["seq"]
    return events


def wait_for_event(api, job_id: str, kind: str, timeout_seconds: float = 180) -> dict:
    deadline = time.monotonic() + timeout_seconds
    after = 0
    while time.monotonic() < deadline:
        for event in api.get(f"/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000}).json()["data"]:
            if event["kind"] == kind:
                return event
            after = event["seq"]
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} recorded no {kind!r} event in {timeout_seconds} s")


def badam_spec(model_dir, dataset: str) -> dict:
    """Two decoder layers, a block switch every 4 steps: steps 1-4 train layer 0, 5-8 layer 1, 9-12 layer 0 ...
    The first checkpoint (step 6) falls in the middle of layer 1's block."""
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": "full",
        "training": {
            "max_steps": 24,
            "micro_batch_size": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-3,
            "seed": 3,
            "checkpoint_every_steps": 6,
            "keep_checkpoints": 2,
            "logging_steps": 1,
        },
        "memory": {"optimizer": "badam", "precision": "bf16-mixed"},
        "badam": {"switch_every_steps": 4, "block_order": "ascending"},
    }


def test_a_badam_job_killed_mid_block_resumes_in_that_block(api, worker, tiny_model, resume_dataset, wait_for_status):
    """Through the API and a real worker: the loss goes down, and the run killed after its step-6 checkpoint
    (layer 1's block, 2 of its 4 steps done) ends with the very weights of an uninterrupted run. Resuming in
    another block, or from the bf16 weights instead of the fp32 masters, would not."""
    spec = badam_spec(tiny_model, resume_dataset)
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    first_checkpoint = wait_for_event(api, job_id, "checkpoint")
    assert first_checkpoint["data"]["step"] == 6
    os.kill(child_pid(job_id), signal.SIGKILL)

    job = wait_for_status(job_id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job["error"]
    assert [(a["outcome"], a["resumed_from_step"]) for a in job["attempts"]] == [("crashed", None), ("succeeded", 6)]

    reference_id = api.post("/v1/jobs", json=spec).json()["id"]
    reference = wait_for_status(reference_id, {"succeeded", "failed", "cancelled"})
    assert reference["status"] == "succeeded", reference["error"]
    resumed, straight = (model_weights(api, some_id) for some_id in (job_id, reference_id))
    max_abs_diff = max((resumed[name].float() - straight[name].float()).abs().max().item() for name in straight)
    print(f"badam resumed from step 6: model max abs diff {max_abs_diff:.3g}")
    assert max_abs_diff <= MAX_ABS_DIFF

    losses = [e["data"]["loss"] for e in all_events(api, reference_id) if e["kind"] == "progress"]
    assert len(losses) == 24 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses


def model_weights(api, job_id: str) -> dict[str, torch.Tensor]:
    response = api.get(f"/v1/jobs/{job_id}/artifacts/model/model.safetensors")
    assert response.status_code == 200
    return load(response.content)
