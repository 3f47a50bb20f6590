"""Sharded jobs through the real API on a CPU worker with two gloo ranks (FTJOBS_CPU_RANKS=2): FSDP2 zero3 and
zero2, full and lora, launched by the worker with torchrun; against one rank on the same global batch; a rank
killed mid-run, resumed from the sharded checkpoint; a cancel that leaves no rank alive."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from harness import RUN_ID, WorkerProcess
from safetensors.torch import load
from test_resume import all_events, child_pid, wait_for_event

# fp32 on both sides: FSDP2 gathers and reduce-scatters fp32 shards, and each rank's loss is its rows' share of
# the global batch's learned tokens, so 2 ranks x micro-batch 1 is one rank x micro-batch 2 up to the order of
# fp32 sums (all-reduce vs one matmul): measured at most 9.5e-7 on these runs. A rank on the wrong rows, a missing
# world-size factor (gradients halved) or a lost update moves the loss curve by 1e-3 or more within 12 steps.
LOSS_TOLERANCE = 1e-4
# The same 2-rank run, straight or killed and resumed from its sharded checkpoint: restored exactly, so only
# reordered fp32 sums across process restarts remain.
RESUME_TOLERANCE = 1e-5
FINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def two_rank_worker(database, redis_client):
    process = WorkerProcess(f"ranks-{RUN_ID}@localhost", FTJOBS_CPU_RANKS="2")
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def sharded_dataset(data_root):
    rows = [{"instruction": f"Spell {i} in words.", "output": f"number {i} " * (1 + i % 4)} for i in range(20)]
    (data_root / "sharded.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return "sharded.jsonl"


def job_spec(model_dir: Path, dataset: str, method: str, ranks: int, sharding: str | None, **training) -> dict:
    resources = {"num_gpus": ranks, "sharding": sharding} if sharding else {}
    spec = {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "method": method,
        "training": {
            "max_steps": 12,
            "micro_batch_size": 2 // ranks,  # the global micro-batch is 2 rows either way
            "max_seq_length": 48,
            "learning_rate": 2e-3,
            "seed": 5,
            "logging_steps": 1,
            **training,
        },
        "memory": {"precision": "fp32", "optimizer": "adamw"},
        "resources": resources,
    }
    if method == "lora":
        spec["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}  # one dropout stream per rank differs from one in all
    return spec


def run_to_end(api, wait_for_status, spec: dict) -> dict:
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = wait_for_status(response.json()["id"], FINAL, timeout_seconds=400)
    assert job["status"] == "succeeded", job["error"]
    return job


def summary(api, job_id: str) -> dict:
    return api.get(f"/v1/jobs/{job_id}/artifacts/summary.json").json()


def weights(api, job_id: str, name: str) -> dict[str, torch.Tensor]:
    response = api.get(f"/v1/jobs/{job_id}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return load(response.content)


@pytest.mark.parametrize(
    "method, sharding, artifact",
    [
        ("full", "zero3", "model/model.safetensors"),
        ("lora", "zero3", "adapter/adapter_model.safetensors"),
        ("full", "zero2", "model/model.safetensors"),
    ],
)
def test_two_ranks_train_as_one_on_the_same_global_batch(
    api, two_rank_worker, wait_for_status, tiny_model, sharded_dataset, method, sharding, artifact
):
    sharded = run_to_end(api, wait_for_status, job_spec(tiny_model, sharded_dataset, method, 2, sharding))
    single = run_to_end(api, wait_for_status, job_spec(tiny_model, sharded_dataset, method, 1, None))
    sharded_summary, single_summary = summary(api, sharded["id"]), summary(api, single["id"])
    assert (sharded_summary["ranks"], sharded_summary["sharding"]) == (2, sharding)
    sharded_losses = [point["loss"] for point in sharded_summary["loss_curve"]]
    single_losses = [point["loss"] for point in single_summary["loss_curve"]]
    gap = max(abs(a - b) for a, b in zip(sharded_losses, single_losses, strict=True))
    print(f"{method} {sharding}: {sharded_losses} vs {single_losses}, max gap {gap:.2e}")
    assert sharded_losses[-1] < sharded_losses[0] - 0.1  # it learns
    assert gap < LOSS_TOLERANCE
    assert sharded_summary["tokens"] == single_summary["tokens"]  # every row of the global batch, once
    # The artifact is one consolidated safetensors file holding every trained tensor whole.
    sharded_weights, single_weights = weights(api, sharded["id"], artifact), weights(api, single["id"], artifact)
    assert sharded_weights.keys() == single_weights.keys()
    assert max((sharded_weights[k] - single_weights[k]).abs().max().item() for k in single_weights) < 1e-3
    peaks = [e["data"] for e in all_events(api, sharded["id"]) if e["data"].get("message", "").startswith("peak")]
    assert len(peaks) == 1 and len(peaks[0]["rank_peak_host_bytes"]) == 2  # each rank reported its own


def test_the_consolidated_adapter_loads_with_peft(
    api, two_rank_worker, wait_for_status, tiny_model, sharded_dataset, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job = run_to_end(api, wait_for_status, job_spec(tiny_model, sharded_dataset, "lora", 2, "zero3"))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapter").mkdir(exist_ok=True)
        (tmp_path / "adapter" / name).write_bytes(api.get(f"/v1/jobs/{job['id']}/artifacts/adapter/{name}").content)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 13]])
    before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    trained = weights(api, job["id"], "adapter/adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) > 0
    assert not torch.allclose(model(input_ids=ids).logits, before)  # the adapter moves the logits


def test_a_rank_killed_mid_run_resumes_from_the_sharded_checkpoint(
    api, two_rank_worker, wait_for_status, tiny_model, sharded_dataset
):
    spec = job_spec(
        tiny_model, sharded_dataset, "lora", 2, "zero3", max_steps=30, checkpoint_every_steps=4, keep_checkpoints=2
    )
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    checkpoint = wait_for_event(api, job_id, "checkpoint", timeout_seconds=300)
    ranks = children(child_pid(job_id))
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)  # a rank, not the agent: torchrun sees it die and ends the other
    job = wait_for_status(job_id, FINAL, timeout_seconds=400)
    assert job["status"] == "succeeded", job["error"]
    first, second = job["attempts"]
    # rank 0 reports its failed collective (rank_lost), unless torchrun stopped it first (crashed)
    assert first["outcome"] in {"rank_lost", "crashed"}, first
    assert second["resumed_from_step"] >= checkpoint["data"]["step"] > 0
    straight = run_to_end(api, wait_for_status, spec)
    resumed, reference = (weights(api, i, "adapter/adapter_model.safetensors") for i in (job_id, straight["id"]))
    gap = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    print(f"resumed from step {second['resumed_from_step']}: adapter max abs diff {gap:.3g}")
    assert gap < RESUME_TOLERANCE
    assert summary(api, job_id)["resumed_from_step"] == second["resumed_from_step"]


def test_a_cancel_leaves_no_rank_alive(api, two_rank_worker, wait_for_status, tiny_model, sharded_dataset):
    spec = job_spec(tiny_model, sharded_dataset, "full", 2, "zero3", max_steps=5000)
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    wait_for_event(api, job_id, "progress", timeout_seconds=300)
    agent = child_pid(job_id)
    members = [agent, *children(agent)]
    assert len(members) == 3  # the torchrun agent and its two ranks (each in a session of its own)
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    assert wait_for_status(job_id, FINAL)["status"] == "cancelled"
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in members if is_alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == []


def children(parent: int) -> list[int]:
    """The live processes `parent` started (torchrun's ranks), oldest first."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_alive(int(entry.name)):
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:  # ppid
                found.append(int(entry.name))
    return sorted(found)


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_one_rank_with_sharding_runs_under_torchrun(api, two_rank_worker, wait_for_status, tiny_model, sharded_dataset):
    """num_gpus 1 with sharding zero3: FSDP2 on one rank (the path a one-GPU memory check measures)."""
    job = run_to_end(api, wait_for_status, job_spec(tiny_model, sharded_dataset, "lora", 1, "zero3"))
    assert (summary(api, job["id"])["ranks"], summary(api, job["id"])["sharding"]) == (1, "zero3")
    logged = [e["data"]["message"] for e in all_events(api, job["id"]) if e["kind"] == "log"]
    assert any(message.startswith("training process") for message in logged)  # the torchrun agent's pid
    assert not any(message.startswith("peak memory per rank") for message in logged)  # that table is for N > 1
