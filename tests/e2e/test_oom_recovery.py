"""A job that runs out of memory for real recovers by itself: the worker gives each job process an address-space limit
(FTJOBS_JOB_MEMORY_LIMIT_BYTES), the requested micro-batch fails to allocate at the step whose rows are long, and the
worker re-plans the job (half the micro-batch, twice the accumulation) and resumes it from its checkpoint as a new
attempt. A job whose recoveries run out fails with out_of_memory and the figures.

The limit is measured, not guessed: a probe process (tests/e2e/oom_probe.py) takes one step on the long rows at
each micro-batch size and reports its peak address space, and the limit lies halfway between the size that must
fit and the size that must not (about 0.5 GiB apart on the model below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import running_stack, wait_until

SEED = 11
LONG_TEXT = " ".join(f"w{i % 97}" for i in range(3000))  # past max_seq_length: every long row is 2048 tokens
TERMINAL = {"succeeded", "failed", "cancelled"}
# RLIMIT_AS counts address space, and glibc reserves 64 MiB of it for each malloc arena, one per thread that
# allocates at the same moment as another, up to 8 per core: how many a run gets depends on timing. Two arenas in
# the probe and in every job process keep the address space a function of the tensors, so the limit holds.
FIXED_ARENAS = {"MALLOC_ARENA_MAX": "2"}


def rows_with_one_long_step(count: int, rows_per_step: int, long_step: int) -> list[dict]:
    """`count` short rows, but those the seeded shuffle deals to step `long_step` of the first epoch are long."""
    from worker.training.data import step_windows

    windows = step_windows(list(range(count)), rows_per_step, 1, SEED)
    for _ in range(long_step - 1):
        next(windows)
    long_rows = {index for micro in next(windows) for index in micro}
    return [{"text": LONG_TEXT if index in long_rows else f"w{index} w{index + 1}."} for index in range(count)]


def spec(model_dir: Path, dataset: str, micro_batch_size: int, epochs: int) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": dataset},
        "dataset_format": "text",
        "method": "lora",
        "lora": {"r": 4, "alpha": 8},
        "training": {
            "epochs": epochs,
            "micro_batch_size": micro_batch_size,
            "max_seq_length": 2048,
            "learning_rate": 1e-3,
            "seed": SEED,
            "checkpoint_every_steps": 1,
            "keep_checkpoints": 2,
        },
        # Activations are what the micro-batch scales: keep them all (no checkpointing, the full logits).
        "memory": {"optimizer": "adamw", "gradient_checkpointing": False, "fused_loss": False},
    }


@pytest.fixture(scope="module")
def oom_model(settings) -> Path:
    from ftjobs.tinymodel import build_tiny_model

    # Wide enough that a 2048-token row holds ~0.25 GiB of activations, well above the address-space noise.
    return build_tiny_model(
        settings.model_root_dirs[0] / "oom-llama", arch="llama", seed=0, hidden_size=512, intermediate_size=2048
    )


@pytest.fixture(scope="module")
def memory_limit_bytes(oom_model, data_root, tmp_path_factory) -> int:
    """Halfway between one step's peak address space at micro-batch 2 (must fit) and at 4 (must not)."""
    work = tmp_path_factory.mktemp("oom-probe")
    (work / "long.jsonl").write_text("\n".join(json.dumps({"text": LONG_TEXT}) for _ in range(4)) + "\n")
    (work / "spec.json").write_text(json.dumps(spec(oom_model, "long.jsonl", 2, 1)))
    probe = Path(__file__).with_name("oom_probe.py")
    argv = [sys.executable, str(probe), str(work / "spec.json"), str(oom_model), str(work / "long.jsonl"), str(work)]
    env = {**os.environ, **FIXED_ARENAS}
    done = subprocess.run([*argv, "2", "4"], capture_output=True, text=True, timeout=300, check=True, env=env)
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    fits, does_not = peaks["2"], peaks["4"]
    assert does_not - fits > 256 * 2**20, peaks  # a margin of more than 128 MiB either side of the limit
    return (fits + does_not) // 2


@pytest.fixture(scope="module")
def oom_stack(memory_limit_bytes, tmp_path_factory):
    directory = tmp_path_factory.mktemp("oom-stack")
    env = {"FTJOBS_JOB_MEMORY_LIMIT_BYTES": str(memory_limit_bytes), "FTJOBS_MAX_OOM_RECOVERIES": "1", **FIXED_ARENAS}
    with running_stack(directory, **env) as stack:
        stack.start_api()
        stack.start_worker("oom")
        yield stack


def wait_for_end(stack, job_id: str) -> dict:
    return wait_until(lambda: (job := stack.job(job_id))["status"] in TERMINAL and job, 300, f"job {job_id} to end")


def test_out_of_memory_halves_the_micro_batch_and_resumes_to_the_same_steps(oom_stack, oom_model, data_root):
    # 16 rows, 4 per step: 4 steps an epoch, 8 in all; step 3 deals the 4 long rows, which micro-batch 4 cannot hold.
    (data_root / "oom-recovers.jsonl").write_text(
        "\n".join(json.dumps(row) for row in rows_with_one_long_step(16, 4, long_step=3)) + "\n"
    )
    job_id = oom_stack.submit(spec(oom_model, "oom-recovers.jsonl", micro_batch_size=4, epochs=2))
    job = wait_for_end(oom_stack, job_id)
    assert job["status"] == "succeeded", job["error"]

    first, second = job["attempts"]
    assert first["outcome"] == "out_of_memory" and "micro_batch_size 4 -> 2" in first["detail"]
    # Step 3 is the first that cannot fit; a later one may be the first that does not (address-space noise).
    assert second["resumed_from_step"] >= 2 and second["outcome"] == "succeeded"
    recovered = [event["data"] for event in oom_stack.events(job_id) if event["kind"] == "oom_recovered"]
    assert len(recovered) == 1
    assert (
        recovered[0]["step"] == second["resumed_from_step"] + 1
        and recovered[0]["device"] == "cpu"
        and recovered[0]["measured_peak_bytes"] > 0
    )
    assert recovered[0]["changes"] == {
        "training.micro_batch_size": [4, 2],
        "training.gradient_accumulation_steps": [1, 2],
    }
    # What ran, and what was asked: the same effective batch.
    assert (job["spec"]["training"]["micro_batch_size"], job["spec"]["training"]["gradient_accumulation_steps"]) == (
        2,
        2,
    )
    asked = job["requested_spec"]["training"]
    assert (asked["micro_batch_size"], asked["gradient_accumulation_steps"]) == (4, 1)
    assert job["oom_recoveries"] == 1

    with oom_stack.client() as client:
        summary = client.get(f"/v1/jobs/{job_id}/artifacts/summary.json").json()
    assert summary["steps"] == 8 and summary["resumed_from_step"] == second["resumed_from_step"]
    assert summary["micro_batch_size"] * summary["gradient_accumulation_steps"] == 4
    # One loss curve across both attempts: steps 1-2 from the checkpoint, 3-8 from the recovered attempt.
    assert [point["step"] for point in summary["loss_curve"]] == list(range(1, 9))


def test_a_job_whose_recoveries_run_out_fails_with_out_of_memory_and_the_figures(oom_stack, oom_model, data_root):
    # 8 long rows in step 3: micro-batch 8 fails, and so does the recovered 4 (the stack allows one recovery).
    (data_root / "oom-exhausts.jsonl").write_text(
        "\n".join(json.dumps(row) for row in rows_with_one_long_step(24, 8, long_step=3)) + "\n"
    )
    job_id = oom_stack.submit(spec(oom_model, "oom-exhausts.jsonl", micro_batch_size=8, epochs=1))
    job = wait_for_end(oom_stack, job_id)

    assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory"
    message = job["error"]["message"]
    assert "ran out of cpu memory at step 3" in message
    assert "measured resident peak" in message and "planned peak" in message
    assert "1 of 1 out-of-memory recoveries used" in message
    assert [attempt["outcome"] for attempt in job["attempts"]] == ["out_of_memory", "failed"]
    assert (
        job["spec"]["training"]["micro_batch_size"] == 4 and job["requested_spec"]["training"]["micro_batch_size"] == 8
    )
