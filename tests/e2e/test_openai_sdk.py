"""The official OpenAI Python SDK (pinned in pyproject) against ftjobs under uvicorn, with a real Celery worker
training on the CPU: files, fine-tuning jobs, events and checkpoints through the SDK's own calls and
pagination, and a checkpoint downloaded mid-run that loads with peft."""

from __future__ import annotations

import io
import json
import tarfile
import time

import httpx
import openai
import pytest

TERMINAL = {"succeeded", "failed", "cancelled"}
# Tiny and fast: 8 conversations, 2 a step, so 4 steps an epoch.
CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Answer with the number."},
            {"role": "user", "content": f"What is {i} plus one?"},
            {"role": "assistant", "content": f"{i + 1}"},
        ]
    }
    for i in range(8)
]
NATIVE = {
    "lora": {"r": 4, "alpha": 8},
    "memory": {"optimizer": "paged_adamw_8bit"},
    "training": {"max_seq_length": 64, "learning_rate": 1e-3},
}


@pytest.fixture(scope="module")
def service(uvicorn_api, make_key, worker):
    key = make_key("openai-sdk", max_active_jobs=100)
    with uvicorn_api() as (url, _pid):
        yield url, key


@pytest.fixture(scope="module")
def client(service) -> openai.OpenAI:
    url, key = service
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key.secret, max_retries=0)


@pytest.fixture(scope="module")
def training_file(client):
    body = "".join(json.dumps(chat) + "\n" for chat in CHATS).encode()
    uploaded = client.files.create(file=("chats.jsonl", io.BytesIO(body)), purpose="fine-tune")
    assert uploaded.object == "file" and uploaded.purpose == "fine-tune" and uploaded.bytes == len(body)
    assert isinstance(uploaded.created_at, int) and uploaded.status == "uploaded"
    return uploaded, body


def _poll(client, job_id: str, statuses: set[str], timeout_seconds: float = 300):
    deadline = time.monotonic() + timeout_seconds
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stayed {job.status}"
        time.sleep(0.3)
    return job


def test_files_through_the_sdk(client, training_file):
    uploaded, body = training_file
    assert client.files.retrieve(uploaded.id).filename == "chats.jsonl"
    assert uploaded.id in [f.id for f in client.files.list()]
    assert list(client.files.list(purpose="batch")) == []  # every file here is a fine-tune file
    assert client.files.content(uploaded.id).read() == body
    spare = client.files.create(file=("spare.jsonl", io.BytesIO(body)), purpose="fine-tune")
    # Two files and a page size of one: the SDK follows `after` to the second page by itself.
    assert {uploaded.id, spare.id} <= {f.id for f in client.files.list(limit=1)}
    deleted = client.files.delete(spare.id)
    assert deleted.deleted and deleted.id == spare.id
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.retrieve(spare.id)
    assert f"no file {spare.id!r}" in str(missing.value) and missing.value.code == "file_not_found"


def test_a_job_trains_to_success_through_the_sdk(client, training_file, tiny_model):
    uploaded, _ = training_file
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=uploaded.id,
        validation_file=uploaded.id,
        seed=7,
        suffix="tiny",
        metadata={"run": "sdk-path"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
        extra_body={"ftjobs": NATIVE},
    )
    assert job.object == "fine_tuning.job" and job.status == "queued" and job.seed == 7
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 2
    assert job.training_file == job.validation_file == uploaded.id and job.metadata == {"run": "sdk-path"}

    done = _poll(client, job.id, TERMINAL)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny-llama:tiny:{job.id}"
    assert done.trained_tokens > 0 and done.finished_at >= done.created_at and done.estimated_finish is None

    # A checkpoint at the end of each of the two epochs (4 steps each), kept after success.
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(job.id, limit=1))
    assert [c.step_number for c in checkpoints] == [8, 4]
    assert all(c.metrics.train_loss > 0 and c.fine_tuning_job_id == job.id for c in checkpoints)

    # Events newest first, through the SDK's auto-pagination three at a time: every native event, once.
    events = list(client.fine_tuning.jobs.list_events(job.id, limit=3))
    first_page = client.fine_tuning.jobs.list_events(job.id, limit=3)
    assert first_page.has_more and len(first_page.data) == 3
    seqs = [int(e.id.removeprefix("ftevent-")) for e in events]
    assert seqs == sorted(seqs, reverse=True) and len(set(seqs)) == len(seqs) > 6
    assert events[0].message == "job succeeded" and events[-1].message == "job queued"
    assert {e.type for e in events} == {"message", "metrics"}
    assert sum(e.data.get("status") == "succeeded" for e in events) == 1
    assert all(e.data["eval_loss"] > 0 for e in events if e.type == "metrics")  # on the validation_file's rows


def _native_status(service, job_id: str, statuses: set[str], timeout_seconds: float = 60) -> str:
    url, key = service
    deadline = time.monotonic() + timeout_seconds
    while (status := httpx.get(f"{url}/v1/jobs/{job_id}", headers=key.headers).json()["status"]) not in statuses:
        assert time.monotonic() < deadline, f"job {job_id} stayed {status}"
        time.sleep(0.3)
    return status


def test_jobs_list_pages_filter_and_cancel(client, service, training_file, tiny_model):
    uploaded, _ = training_file
    created = [
        client.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=uploaded.id,
            metadata={"run": "cancel-me", "n": str(n)},
            extra_body={"ftjobs": {**NATIVE, "training": {"max_steps": 100_000}}},
        )
        for n in range(2)
    ]
    ids = [job.id for job in created]
    listed = [job.id for job in client.fine_tuning.jobs.list(limit=1, metadata={"run": "cancel-me"})]
    assert listed == ids[::-1]  # newest first, one page each, only the jobs with this metadata
    assert [job.id for job in client.fine_tuning.jobs.list(metadata={"run": "cancel-me", "n": "1"})] == [ids[1]]
    for job_id in ids:
        assert client.fine_tuning.jobs.cancel(job_id).status == "cancelled"
    # A running job's process is being stopped (natively: cancelling); the SDK already reads it as cancelled.
    assert {_native_status(service, job_id, TERMINAL) for job_id in ids} == {"cancelled"}
    with pytest.raises(openai.ConflictError) as again:
        client.fine_tuning.jobs.cancel(ids[0])
    assert again.value.code == "invalid_transition"


def test_errors_carry_their_message(client, training_file, tiny_model):
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        client.fine_tuning.jobs.create(model=str(tiny_model), training_file="file_" + "0" * 24)
    assert "no uploaded file file_000000000000000000000000" in str(unknown.value)
    assert unknown.value.code == "dataset_not_found" and unknown.value.type == "invalid_request_error"

    uploaded, _ = training_file
    with pytest.raises(openai.UnprocessableEntityError) as refused:  # the planner's refusal, as on /v1/jobs
        client.fine_tuning.jobs.create(
            model=str(tiny_model),
            training_file=uploaded.id,
            extra_body={"ftjobs": {"resources": {"gpu_memory_gib": 0.01}}},
        )
    assert refused.value.code == "does_not_fit" and "exceeds the" in str(refused.value)

    with pytest.raises(openai.UnprocessableEntityError) as typo:
        client.fine_tuning.jobs.create(
            model=str(tiny_model), training_file=uploaded.id, extra_body={"ftjobs": {"training": {"epoch": 2}}}
        )
    assert typo.value.param == "ftjobs.training.epoch" and "Extra inputs" in str(typo.value)

    with pytest.raises(openai.NotFoundError) as missing:
        client.fine_tuning.jobs.retrieve("job_" + "0" * 24)
    assert "no job" in str(missing.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0).fine_tuning.jobs.list()


def test_a_checkpoint_downloaded_mid_run_loads_with_peft(client, service, training_file, tiny_model, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    url, key = service
    uploaded, _ = training_file
    job = client.fine_tuning.jobs.create(
        model=str(tiny_model),
        training_file=uploaded.id,
        extra_body={
            "ftjobs": {**NATIVE, "training": {**NATIVE["training"], "max_steps": 100_000, "checkpoint_every_steps": 2}}
        },
    )
    native = httpx.Client(base_url=url, headers=key.headers)
    deadline = time.monotonic() + 180
    while not (kept := native.get(f"/v1/jobs/{job.id}/checkpoints").json()["data"]):
        assert time.monotonic() < deadline, "no checkpoint was kept"
        time.sleep(0.3)
    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running" and running.trained_tokens > 0
    assert running.estimated_finish > running.created_at  # 100,000 steps to go: far ahead
    checkpoint = kept[0]
    assert checkpoint["step"] % 2 == 0 and checkpoint["metrics"]["train_loss"] > 0

    download = native.get(checkpoint["url"])
    assert download.status_code == 200 and download.headers["content-type"] == "application/x-tar"
    client.fine_tuning.jobs.cancel(job.id)
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())
        tar.extractall(tmp_path / "adapter", filter="data")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter")
    loaded = {name: parameter for name, parameter in model.named_parameters() if "lora_B" in name}
    assert loaded and any(parameter.abs().sum() > 0 for parameter in loaded.values())  # trained: B starts at 0
    name = next(iter(saved))
    assert name.replace(".weight", ".default.weight") in dict(model.named_parameters())
    assert _native_status(service, job.id, TERMINAL) == "cancelled"
