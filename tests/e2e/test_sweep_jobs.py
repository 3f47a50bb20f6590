"""A sweep end to end on the CPU: the API under uvicorn, a real worker with two slots whose maintenance loop drives
optuna, eight trials on the tiny model, two at a time. One configuration cannot fit the stated GPU memory and is
pruned before it is queued; optuna's median pruner stops a poor one early (its job cancelled, with the reason);
the best trial's eval loss is the minimum of the finished ones.

What makes the early prune certain rather than likely: the first trials are enqueued configurations, two with a
learning rate that lowers the eval loss within a few steps and one (1e-7) that leaves it where it started; the
pruner needs one completed trial, and with two slots that poor trial is only asked once one of the good ones has
completed; its job evaluates every 4th of 40 steps (a fifth of a second each here), so the driver's half-second
rounds see its first evals past the warm-up, and judge them, with 30-odd steps still to go, and a cancel reaches
it within a second. Training on the CPU is seeded and deterministic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from harness import WorkerProcess

pytestmark = pytest.mark.timeout(420)
GIB = 1024**3
GOOD, POOR = {"training.micro_batch_size": 2, "lora.r": 8}, 1e-7


@pytest.fixture(scope="module")
def service(uvicorn_api, make_key, data_root):
    rows = [{"instruction": f"Repeat the word number {i}.", "output": f"word {i} word {i} word {i}"} for i in range(32)]
    (data_root / "sweep-e2e.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    key = make_key("sweeps-e2e", max_active_jobs=20)
    worker = WorkerProcess(
        "sweeps-e2e@localhost",
        FTJOBS_CPU_RANKS="2",  # two slots: two trials train at once
        FTJOBS_RECONCILE_INTERVAL_SECONDS="0.5",  # the driver's round
        FTJOBS_CANCEL_POLL_SECONDS="0.2",  # a pruned trial's job stops within a step or two
        FTJOBS_WORKER_METRICS_PORT="0",
    )
    try:
        worker.wait_ready()
        with uvicorn_api() as (url, _pid):
            yield url, key
    finally:
        worker.stop()


def sweep_request(tiny_model) -> dict:
    spec = {
        "base_model": str(tiny_model),
        "method": "lora",
        "dataset": {"path": "sweep-e2e.jsonl"},
        # Eval every 4th step (max_steps // 10, worker/training/extras.py), on 4 held-out examples.
        "training": {"max_steps": 40, "max_seq_length": 64, "validation_fraction": 0.125, "seed": 3},
        "resources": {"gpu_memory_gib": 2},  # micro_batch_size 1024 needs more (POST /v1/plans on the tiny model)
    }
    return {
        "spec": spec,
        "search_space": {
            "training.learning_rate": {"type": "log_uniform", "low": 1e-7, "high": 3e-2},
            "training.micro_batch_size": {"type": "categorical", "choices": [2, 4, 1024]},
            "lora.r": {"type": "categorical", "choices": [4, 8]},
        },
        "n_trials": 8,
        "parallelism": 2,
        "metric": "eval_loss",
        "direction": "minimize",
        "sampler": {"type": "tpe", "seed": 7},
        "pruner": {"type": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
        "enqueue_trials": [
            {"training.micro_batch_size": 1024, "training.learning_rate": 1e-3, "lora.r": 8},
            {**GOOD, "training.learning_rate": 3e-2},
            {**GOOD, "training.learning_rate": 2e-2},
            {**GOOD, "training.learning_rate": POOR},
        ],
    }


def test_a_sweep_prunes_what_cannot_fit_and_what_does_poorly(service, tiny_model):
    url, key = service
    response = httpx.post(f"{url}/v1/sweeps", json=sweep_request(tiny_model), headers=key.headers)
    assert response.status_code == 201, response.text
    sweep_id = response.json()["id"]
    deadline = time.monotonic() + 360
    while (sweep := httpx.get(f"{url}/v1/sweeps/{sweep_id}", headers=key.headers).json())["status"] == "running":
        assert time.monotonic() < deadline, f"sweep still running: {sweep['trials']}"
        time.sleep(1)
    assert sweep["status"] == "succeeded", sweep
    trials = sweep["trials"]
    assert [trial["number"] for trial in trials] == list(range(8))
    assert {trial["state"] for trial in trials} <= {"complete", "pruned", "failed"}

    # The unfit configuration: planned, pruned with the planner's peak, never a job.
    unfit = trials[0]
    assert unfit["state"] == "pruned" and unfit["job_id"] is None, unfit
    assert unfit["pruned_reason"].startswith("does not fit: predicted peak"), unfit
    assert unfit["predicted_peak_bytes"] > 1 * GIB  # over the 2 GiB GPU less its 1 GiB safety margin

    # Every trial that ran was a job of the tenant, planned first.
    ran = [trial for trial in trials if trial["job_id"]]
    assert all(trial["predicted_peak_bytes"] for trial in ran)

    # At least one was stopped early by optuna: its job cancelled, with the reason on the job too.
    early = [trial for trial in ran if (trial["pruned_reason"] or "").startswith("pruned by optuna's median pruner")]
    # The poor one for certain, judged at its first evals past the warm-up: its job cancelled well before step 40.
    # (Another trial pruned near its end may still finish: a job that ends while its cancel is on the way keeps
    # its outcome.)
    poor = [trial for trial in early if trial["params"]["training.learning_rate"] == POOR]
    assert poor, trials
    job = httpx.get(f"{url}/v1/jobs/{poor[0]['job_id']}", headers=key.headers).json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < 40, job
    events = httpx.get(f"{url}/v1/jobs/{poor[0]['job_id']}/events", headers=key.headers).json()["data"]
    assert any(e["data"].get("reason") == poor[0]["pruned_reason"] for e in events if e["kind"] == "state")

    # The best trial is the finished trial with the lowest eval loss, which is its job's last eval loss.
    complete = [trial for trial in trials if trial["state"] == "complete"]
    assert complete and sweep["best_trial"]["value"] == min(trial["value"] for trial in complete)
    best_job = httpx.get(f"{url}/v1/jobs/{sweep['best_trial']['job_id']}", headers=key.headers).json()
    assert best_job["status"] == "succeeded" and best_job["progress"]["eval_loss"] == sweep["best_trial"]["value"]


def test_the_cli_creates_reads_and_cancels_a_sweep(service, tiny_model, tmp_path):
    url, key = service
    request = sweep_request(tiny_model) | {"n_trials": 2, "parallelism": 1, "enqueue_trials": []}
    (tmp_path / "sweep.json").write_text(json.dumps(request))
    env = {**os.environ, "FTJOBS_URL": url, "FTJOBS_API_KEY": key.secret}

    def ftjobs(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ftjobs.cli", *args], capture_output=True, text=True, env=env)

    created = ftjobs("sweeps", "create", "--file", str(tmp_path / "sweep.json"), "--json")
    assert created.returncode == 0, created.stderr
    sweep_id = json.loads(created.stdout)["id"]
    shown = ftjobs("sweeps", "get", sweep_id)
    assert shown.returncode == 0 and f"id        {sweep_id}" in shown.stdout and "STATE" in shown.stdout, shown
    cancelled = ftjobs("sweeps", "cancel", sweep_id, "--json")
    assert cancelled.returncode == 0 and json.loads(cancelled.stdout)["status"] in ("cancelling", "cancelled")
    missing = ftjobs("sweeps", "get", "swp_000000000000000000000000")
    assert missing.returncode != 0 and "sweep_not_found" in missing.stderr + missing.stdout
