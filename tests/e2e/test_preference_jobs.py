"""Preference jobs through the API, trained by a real Celery worker on the tiny model: dpo, kto and orpo for lora
and qlora, dpo for full with a precomputed reference (native POST /v1/jobs), and dpo through the OpenAI SDK's
`method={"type": "dpo", ...}` on an OpenAI preference file."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

TERMINAL = {"succeeded", "failed", "cancelled"}
PROMPTS = [f"Describe thing {i}:" for i in range(8)]
OPENAI_ROWS = [
    {"input": {"messages": [{"role": "user", "content": prompt}]},
     "preferred_output": [{"role": "assistant", "content": "It is red."}],
     "non_preferred_output": [{"role": "assistant", "content": "A cat."}]}
    for prompt in PROMPTS
]  # fmt: skip
PAIRS = [{"prompt": prompt + " ", "chosen": "it is red", "rejected": "a cat"} for prompt in PROMPTS]
LABELED = [{"prompt": prompt + " ", "completion": c, "label": c == "it is red"} for prompt in PROMPTS
           for c in ("it is red", "a cat")]  # fmt: skip
TRAINING = {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 48, "seed": 3}


@pytest.fixture(scope="module")
def service(uvicorn_api, make_key, worker):
    key = make_key("preference", max_active_jobs=100)
    with uvicorn_api() as (url, _pid):
        yield url, key


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    url, key = service
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key.secret, max_retries=0)


def _upload(client, name: str, rows: list[dict]) -> str:
    body = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return client.files.create(file=(name, io.BytesIO(body)), purpose="fine-tune").id


def _wait(service, job_id: str, timeout_seconds: float = 300) -> dict:
    url, key = service
    deadline = time.monotonic() + timeout_seconds
    while (job := httpx.get(f"{url}/v1/jobs/{job_id}", headers=key.headers).json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, f"job {job_id} stayed {job['status']}"
        time.sleep(0.5)
    return job


def _summary(service, job: dict) -> dict:
    url, key = service
    [artifact] = [a for a in job["artifacts"] if a["name"] == "summary.json"]
    return httpx.get(f"{url}{artifact['url']}", headers=key.headers, follow_redirects=True).json()


CASES = [
    ("dpo", "lora", None), ("dpo", "qlora", None), ("kto", "lora", None), ("kto", "qlora", None),
    ("orpo", "lora", None), ("orpo", "qlora", None), ("dpo", "full", "precomputed"),
]  # fmt: skip


def test_dpo_kto_and_orpo_jobs_train_through_the_native_api(service, client, tiny_model):
    url, key = service
    pairs, labeled = _upload(client, "pairs.jsonl", PAIRS), _upload(client, "kto.jsonl", LABELED)
    submitted = []
    for objective, method, reference in CASES:
        spec = {
            "base_model": str(tiny_model), "method": method, "objective": objective, "training": TRAINING,
            "dataset": {"file_id": labeled if objective == "kto" else pairs},
            "dataset_format": "kto" if objective == "kto" else "preference",
        }  # fmt: skip
        if reference:
            spec[objective] = {"reference": reference}
        response = httpx.post(f"{url}/v1/jobs", json=spec, headers=key.headers)
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["spec"]["objective"] == objective
        submitted.append(job["id"])
    for (objective, method, reference), job_id in zip(CASES, submitted, strict=True):
        job = _wait(service, job_id)
        assert job["status"] == "succeeded", (objective, method, job["error"])
        preference = job["progress"]["preference"]
        assert {"chosen_reward", "rejected_reward", "margin"} <= set(preference), preference
        summary = _summary(service, job)
        assert summary["objective"] == objective and summary["steps"] == 2
        expected = reference or {"kto": "adapter_disabled", "dpo": "adapter_disabled"}.get(objective)
        assert (summary["reference"] or {}).get("kind") == expected


def test_a_malformed_preference_file_is_refused_with_its_line(service, client, tiny_model):
    url, key = service
    bad = _upload(client, "bad.jsonl", [*PAIRS[:2], {"prompt": "x", "chosen": "same", "rejected": "same"}])
    spec = {"base_model": str(tiny_model), "objective": "dpo", "dataset_format": "preference", "method": "lora",
            "dataset": {"file_id": bad}, "training": TRAINING}  # fmt: skip
    response = httpx.post(f"{url}/v1/jobs", json=spec, headers=key.headers)  # every row checked at submission
    assert response.status_code == 422, response.text
    problem = response.json()
    assert problem["code"] == "invalid_dataset" and "line 3" in problem["detail"], problem
    assert "nothing to prefer" in problem["detail"]


def test_a_dpo_job_through_the_openai_sdk(client, tiny_model):
    file_id = _upload(client, "prefs.jsonl", OPENAI_ROWS)
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=file_id,
        seed=5,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 2}}},
        extra_body={"ftjobs": {"method": "lora", "training": {"max_seq_length": 64}}},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    deadline = time.monotonic() + 300
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in TERMINAL:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    assert job.trained_tokens > 0 and job.method.dpo.hyperparameters.n_epochs == 1
