"""The CLI as a user runs it (a subprocess of `python -m ftjobs.cli`) against the API under uvicorn and a real
worker: files, jobs, events, the artifact archive, and every exit code. Errors are one line, never a traceback."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

HUB_ID = "ftjobs-test/tiny-llama"
TERMINAL = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def hub_cache(tiny_model, tmp_path_factory) -> Path:
    """The tiny model as a snapshot in a Hugging Face cache of its own, so a job can name it by a hub id."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_model, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return cache


@pytest.fixture(scope="module")
def service_url(uvicorn_api, worker, hub_cache):
    with uvicorn_api(HF_HUB_CACHE=str(hub_cache), FTJOBS_RATE_LIMIT_REQUESTS="100000") as (url, _pid):
        yield url


@pytest.fixture()
def ftjobs(service_url, admin_key, tmp_path):
    """ftjobs(*args, expect=0) -> CompletedProcess, with FTJOBS_URL and FTJOBS_API_KEY pointing at the service."""
    env = {**os.environ, "FTJOBS_URL": service_url, "FTJOBS_API_KEY": admin_key.secret}

    def run(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "ftjobs.cli", *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        if expect != 0 and expect != 1:
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result

    return run


def json_out(result: subprocess.CompletedProcess):
    return json.loads(result.stdout)


def dataset_file(tmp_path: Path, rows: int = 8) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} {i}"}) + "\n" for i in range(rows)))
    return path


def tiny_spec(base_model: str, dataset: dict, **extra) -> dict:
    return {
        "base_model": base_model,
        "dataset": dataset,
        "method": "qlora",
        "lora": {"r": 4, "alpha": 8},
        "training": {"max_steps": 2, "micro_batch_size": 2, "max_seq_length": 64},
        **extra,
    }


def test_files_upload_list_get_and_delete(ftjobs, tmp_path):
    uploaded = json_out(ftjobs("files", "upload", str(dataset_file(tmp_path)), "--format", "alpaca", "--json"))
    assert uploaded["id"].startswith("file_") and uploaded["rows"] == 8 and uploaded["filename"] == "train.jsonl"
    assert uploaded["id"] in ftjobs("files", "list").stdout
    listed = json_out(ftjobs("files", "list", "--json", "--limit", "200"))
    assert uploaded["id"] in [f["id"] for f in listed["data"]]
    assert json_out(ftjobs("files", "get", uploaded["id"], "--json"))["size_bytes"] == uploaded["size_bytes"]
    assert f"deleted {uploaded['id']}" in ftjobs("files", "delete", uploaded["id"]).stdout
    gone = ftjobs("files", "get", uploaded["id"], expect=2)
    assert gone.stderr.startswith("ftjobs: file_not_found:")
    problem = json.loads(ftjobs("files", "get", uploaded["id"], "--json", expect=2).stderr)
    assert problem["code"] == "file_not_found" and problem["status"] == 404
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"instruction": "no output"}\n')
    assert "invalid_dataset" in ftjobs("files", "upload", str(bad_rows), "--format", "alpaca", expect=2).stderr
    missing = ftjobs("files", "upload", str(tmp_path / "nope.jsonl"), expect=2)
    assert "nope.jsonl" in missing.stderr and "No such file" in missing.stderr


def test_a_job_on_a_hub_id_trains_and_its_artifacts_serve(ftjobs, service_url, admin_key, tmp_path):
    file_id = json_out(ftjobs("files", "upload", str(dataset_file(tmp_path)), "--json"))["id"]
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(tiny_spec(HUB_ID, {"file_id": file_id}, output={"merge_adapter": True})))

    watched = ftjobs("submit", str(spec_path), "--watch")
    job_id = watched.stdout.split()[1]
    assert " succeeded " in watched.stdout
    job = json_out(ftjobs("jobs", "get", job_id, "--json"))
    assert job["status"] == "succeeded" and "status    succeeded" in ftjobs("jobs", "get", job_id).stdout
    assert job_id in [j["id"] for j in json_out(ftjobs("jobs", "list", "--json", "--status", "succeeded"))["data"]]

    followed = ftjobs("jobs", "events", job_id, "--follow", "--json").stdout.splitlines()
    states = [e["data"]["status"] for e in map(json.loads, followed) if e["kind"] == "state"]
    assert states == ["queued", "running", "succeeded"]
    events = json_out(ftjobs("jobs", "events", job_id, "--json"))
    assert [e["seq"] for e in events["data"]] == [json.loads(line)["seq"] for line in followed]

    # The archive holds every artifact, byte for byte as the per-file route serves it.
    names = {artifact["name"] for artifact in job["artifacts"]}
    archive = httpx.get(f"{service_url}/v1/jobs/{job_id}/artifacts.tar", headers=admin_key.headers, timeout=60)
    assert archive.status_code == 200 and archive.headers["content-type"] == "application/x-tar"
    assert int(archive.headers["content-length"]) == len(archive.content)
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert set(tar.getnames()) == names
        summary = tar.extractfile("summary.json").read()
    assert (
        summary
        == httpx.get(f"{service_url}/v1/jobs/{job_id}/artifacts/summary.json", headers=admin_key.headers).content
    )

    ftjobs("jobs", "download", job_id, "--extract", "out")
    out = tmp_path / "out"
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == names
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == HUB_ID
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(out / "tokenizer").chat_template
    assert "<|start_header_id|>" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ftjobs("jobs", "download", job_id, "-o", "all.tar")
    assert tarfile.open(tmp_path / "all.tar").getnames() == sorted(names)


def test_a_job_that_fails_in_the_worker_exits_1_with_its_error(ftjobs, tiny_model, data_root, store_queued_job):
    from service.queue import enqueue_job

    path = data_root / "cli-breaks.jsonl"
    good = json.dumps({"instruction": "Say hi.", "output": "Hi!"})
    path.write_text("\n".join([good] * 4) + "\n")
    job_id = store_queued_job(tiny_spec(str(tiny_model), {"path": path.name}))
    # Broken after the API validated it, so the worker's own check fails the job (tests/e2e/test_invalid_dataset_job.py)
    path.write_text("\n".join([good, json.dumps({"instruction": "no output"}), good]) + "\n")
    enqueue_job(job_id)

    followed = ftjobs("jobs", "events", job_id, "--follow", expect=1)
    assert "failed" in followed.stdout and "error invalid_dataset: line 2:" in followed.stdout
    assert "error invalid_dataset: line 2:" in ftjobs("status", job_id, expect=1).stdout
    assert "error invalid_dataset: line 2:" in ftjobs("jobs", "get", job_id, expect=1).stdout
    assert json_out(ftjobs("jobs", "get", job_id, "--json", expect=1))["error"]["code"] == "invalid_dataset"
    no_artifacts = ftjobs("jobs", "download", job_id, expect=2)
    assert no_artifacts.stderr.startswith("ftjobs: artifact_not_found:")


def test_a_cancelled_job_exits_1_and_a_second_cancel_is_refused(ftjobs, tiny_model, store_queued_job, tmp_path):
    file_id = json_out(ftjobs("files", "upload", str(dataset_file(tmp_path)), "--json"))["id"]
    job_id = store_queued_job(tiny_spec(str(tiny_model), {"file_id": file_id}))  # never sent: stays queued
    assert ftjobs("files", "delete", file_id, expect=2).stderr.startswith("ftjobs: file_in_use:")
    assert ftjobs("jobs", "cancel", job_id).stdout.strip() == f"{job_id} cancelled"
    ftjobs("files", "delete", file_id)  # the job has ended: nothing reads the file any more
    assert "cancelled" in ftjobs("status", job_id, expect=1).stdout
    assert json_out(ftjobs("jobs", "get", job_id, "--json", expect=1))["status"] == "cancelled"
    again = ftjobs("jobs", "cancel", job_id, expect=2)
    assert again.stderr.startswith("ftjobs: invalid_transition:")


def test_bad_input_exits_2_with_one_line(ftjobs, service_url, tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps({"base_model": "tiny-llama", "methd": "qlora"}))
    refused = ftjobs("submit", str(spec_path), expect=2)
    assert refused.stderr.startswith("ftjobs: invalid_spec:") and "methd" in refused.stderr
    assert json.loads(ftjobs("submit", str(spec_path), "--json", expect=2).stderr)["status"] == 422
    spec_path.write_text("[1, 2]")
    assert "not an object" in ftjobs("submit", str(spec_path), expect=2).stderr
    spec_path.write_text("{not json")
    assert "is not JSON" in ftjobs("submit", str(spec_path), expect=2).stderr
    assert "cannot read" in ftjobs("submit", str(tmp_path / "missing.json"), expect=2).stderr
    assert ftjobs("jobs", "get", "job_nope", expect=2).stderr.startswith("ftjobs: job_not_found:")
    assert "ftjobs:" in ftjobs("jobs", "list", "--limit", "0", expect=2).stderr
    assert ftjobs("jobs", "list", "--after", "job_nope", expect=2).stderr.startswith("ftjobs: invalid_cursor:")
    unauthenticated = subprocess.run(
        [sys.executable, "-m", "ftjobs.cli", "jobs", "list", "--api-key", "wrong"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FTJOBS_URL": service_url},
    )
    assert unauthenticated.returncode == 2 and unauthenticated.stderr.startswith("ftjobs: unauthenticated:")
    usage = subprocess.run(
        [sys.executable, "-m", "ftjobs.cli", "jobs", "frobnicate"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2 and "Traceback" not in usage.stderr
