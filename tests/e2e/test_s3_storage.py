"""The API and a worker that share nothing but PostgreSQL, Redis and an S3 bucket: each has its own local home
directory, so every file that crosses from one to the other (the upload, a dataset by path, the checkpoints a
resumed attempt starts from, the adapter) must have gone through the S3 endpoint."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile

import boto3
import pytest
from harness import job_spec, running_stack
from safetensors.torch import load

pytestmark = [pytest.mark.timeout(420)]


@pytest.fixture()
def s3_stack(database, settings, s3_endpoint, tmp_path):
    storage_url = f"s3://ftjobs/deploy-{tmp_path.name}"
    # Both machines' own homes, but the test's models: the same local model directory on each machine.
    model_roots = ":".join(str(root) for root in settings.model_root_dirs)
    with running_stack(
        tmp_path, FTJOBS_STORAGE_URL=storage_url, FTJOBS_S3_ENDPOINT_URL=s3_endpoint, FTJOBS_MODEL_ROOTS=model_roots
    ) as stack:
        stack.start_api(FTJOBS_HOME=str(tmp_path / "api-machine"))
        stack.start_worker("w1", FTJOBS_HOME=str(tmp_path / "worker-machine"))
        yield stack, storage_url, tmp_path


def test_upload_train_resume_and_download_through_s3(s3_stack, tiny_model, s3_endpoint):
    stack, storage_url, machines = s3_stack
    rows = [{"instruction": f"Name the number {i}.", "output": f"number {i}"} for i in range(30)]
    api = stack.client()
    upload = api.post(
        "/v1/files", files={"file": ("rows.jsonl", "\n".join(map(json.dumps, rows)) + "\n")}, data={"format": "alpaca"}
    )
    assert upload.status_code == 201, upload.text
    spec = job_spec(tiny_model, "unused", max_steps=60)
    spec["dataset"] = {"file_id": upload.json()["id"]}
    job_id = api.post("/v1/jobs", json=spec).json()["id"]
    stack.running_attempt(job_id, 1)
    checkpoint = stack.wait_for_checkpoint(job_id, 1)
    os.kill(stack.child_pid(job_id, 1), signal.SIGKILL)  # the next attempt must fetch its checkpoint from S3
    job = stack.wait_for_end(job_id)

    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"][1]["resumed_from_step"] >= checkpoint["data"]["step"] > 0
    adapter = api.get(f"/v1/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors")
    assert adapter.status_code == 200
    assert any("lora_B" in name and (tensor.abs() > 0).any() for name, tensor in load(adapter.content).items())
    archive = api.get(f"/v1/jobs/{job_id}/artifacts.tar")  # streamed from the bucket, file by file
    assert archive.status_code == 200, archive.text
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert set(tar.getnames()) == {artifact["name"] for artifact in job["artifacts"]}
        assert tar.extractfile("adapter/adapter_model.safetensors").read() == adapter.content
    bucket, prefix = storage_url.removeprefix("s3://").split("/", 1)
    keys = {
        item["Key"]
        for item in boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)[
            "Contents"
        ]
    }
    assert f"{prefix}/jobs/{job_id}/artifacts/adapter/adapter_model.safetensors" in keys
    assert f"{prefix}/files/{upload.json()['id']}.jsonl" in keys
    # Nothing of the job lives on either machine's disk: the API keeps no files, the worker cleans its stage.
    assert not [p for p in (machines / "api-machine").rglob("*") if job_id in str(p) or p.suffix == ".jsonl"]
    assert not [p for p in (machines / "worker-machine").rglob("*") if job_id in str(p)]


def test_dataset_by_path_resolves_under_the_s3_data_root(s3_stack, tiny_model, s3_endpoint):
    stack, storage_url, _ = s3_stack
    bucket, prefix = storage_url.removeprefix("s3://").split("/", 1)
    rows = [{"text": f"row {i} of a dataset that lives in a bucket"} for i in range(12)]
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key=f"{prefix}/data/team/rows.jsonl", Body="\n".join(map(json.dumps, rows)) + "\n"
    )
    spec = {**job_spec(tiny_model, "team/rows.jsonl", max_steps=3), "dataset_format": "text"}
    api = stack.client()
    assert (
        api.post("/v1/jobs", json={**spec, "dataset": {"path": "../escape.jsonl"}}).json()["code"]
        == "dataset_path_escapes_root"
    )
    assert (
        api.post("/v1/jobs", json={**spec, "dataset": {"path": "team/missing.jsonl"}}).json()["code"]
        == "dataset_not_found"
    )
    response = api.post("/v1/jobs", json=spec)
    assert response.status_code == 201, response.text
    job = stack.wait_for_end(response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] == 3
