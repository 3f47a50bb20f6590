"""Planning through the API: a local config.json always wins, config-only directories plan but do not train,
configs the planner does not model are refused with their code, and multi-GPU jobs plan but are not queued yet."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import func, select

from service.db import transaction
from service.models import Job

GIB = 2**30


def assert_problem(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["code"] == code and body["detail"]
    return body


def job_count() -> int:
    with transaction() as session:
        return session.scalar(select(func.count(Job.seq)))


@pytest.fixture()
def models(settings, tmp_path):
    """A directory of this test's own inside the API's model roots: the API reads models nowhere else."""
    directory = settings.model_root_dirs[0] / f"scope-{tmp_path.name}"
    directory.mkdir(parents=True)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture()
def config_only(tiny_model, models):
    """A directory holding the tiny model's config.json and nothing else."""
    directory = models / "config-only"
    directory.mkdir()
    shutil.copy(tiny_model / "config.json", directory / "config.json")
    return directory


def with_config(tmp_path, name: str, config: dict):
    directory = tmp_path / name
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_config_only_directory_plans_but_is_not_submitted(api, config_only, data_root):
    spec = {"base_model": str(config_only), "method": "lora", "training": {"max_seq_length": 64}}
    planned = api.post("/v1/plans", json=spec)
    assert planned.status_code == 200, planned.text
    assert planned.json()["peak_vram_bytes"] > 0
    (data_root / "scope.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    before = job_count()
    body = assert_problem(
        api.post("/v1/jobs", json=spec | {"dataset": {"path": "scope.jsonl"}}), 422, "base_model_not_found"
    )
    assert "safetensors" in body["detail"] and job_count() == before


def test_local_config_wins_over_a_catalog_name(api, tiny_model, models):
    local = models / "Qwen2.5-7B"  # named like the catalog's Qwen/Qwen2.5-7B
    local.mkdir(parents=True)
    shutil.copy(tiny_model / "config.json", local / "config.json")
    spec = {"method": "full", "training": {"max_seq_length": 64, "micro_batch_size": 1}}
    mine = api.post("/v1/plans", json=spec | {"base_model": str(local)}).json()
    catalog = api.post("/v1/plans", json=spec | {"base_model": "Qwen/Qwen2.5-7B"}).json()
    assert mine["breakdown"]["weights"] < 1e8 < 7e9 < catalog["breakdown"]["weights"]


REFUSED = [
    (
        {
            "model_type": "bert",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "vocab_size": 30522,
        },
        "unsupported_architecture",
    ),
    (
        {
            "model_type": "qwen2_vl",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "vision_config": {"depth": 32},
        },
        "unsupported_architecture",
    ),
    (
        {
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32000,
            "quantization_config": {"quant_method": "gptq", "bits": 4},
        },
        "unsupported_quantization",
    ),
]


@pytest.mark.parametrize("config, code", REFUSED)
def test_configs_out_of_scope_are_refused(api, models, config, code):
    directory = with_config(models, "refused", config)
    assert_problem(api.post("/v1/plans", json={"base_model": str(directory)}), 422, code)


def test_spec_against_model_problems_are_all_listed(api, tiny_model):
    spec = {
        "base_model": str(tiny_model),
        "method": "lora",
        "lora": {"target_modules": ["c_attn"]},
        "training": {"max_seq_length": 4096},
    }  # the tiny model: max_position_embeddings 2048
    body = assert_problem(api.post("/v1/plans", json=spec), 422, "invalid_lora_targets")
    assert [p["code"] for p in body["problems"]] == ["invalid_lora_targets", "sequence_too_long"]


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"method": "qlora"}, "method qlora: the workers do not shard bitsandbytes' 4-bit weights"),
        ({"resources": {"num_gpus": 2, "offload": "optimizer"}}, "use offload 'params'"),
        ({"lora": {"init": "pissa"}}, "lora.init 'pissa'"),
        ({"memory": {"liger_kernels": True}}, "memory.liger_kernels: the sharded root runs the chunked loss"),
        ({"memory": {"offload_activations": True}}, "memory.offload_activations: a sharded layer's gathered"),
    ],
)
def test_sharded_combinations_the_workers_do_not_train_plan_but_are_not_queued(
    api, tiny_model, data_root, change, needle
):
    spec = {
        "base_model": str(tiny_model),
        "method": "lora",
        "training": {"max_seq_length": 64},
        "resources": {"num_gpus": 2, "sharding": "zero3"},
    } | change
    planned = api.post("/v1/plans", json=spec)
    assert planned.status_code == 200, planned.text
    assert planned.json()["num_gpus"] == 2 and "fsdp_allgathered_params" in planned.json()["breakdown"]
    (data_root / "scope.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    before = job_count()
    body = assert_problem(
        api.post("/v1/jobs", json=spec | {"dataset": {"path": "scope.jsonl"}}), 422, "unsupported_sharding"
    )
    assert needle in body["detail"] and job_count() == before


@contextmanager
def live_worker(name: str, gpus: int) -> Iterator[None]:
    """A worker's H100s registered as a live worker's, for the test's duration."""
    from service.jobs import repository

    with transaction() as session:
        repository.register_gpus(session, name, [(i, "H100", 80 * GIB) for i in range(gpus)])
    try:
        yield
    finally:
        with transaction() as session:
            repository.unregister_gpus(session, name)


@pytest.fixture()
def eight_gpu_worker():
    with live_worker("scope-8gpu", 8):
        yield


def test_does_not_fit_suggests_the_gpus_a_worker_has(api, eight_gpu_worker):
    spec = {"base_model": "Qwen/Qwen2.5-7B", "method": "full", "memory": {"optimizer": "adamw"}}
    plan = api.post("/v1/plans", json=spec).json()
    assert plan["fits"] is False and plan["gpu_memory_bytes"] == 80 * GIB
    sharded = [s for s in plan["suggestions"] if "num_gpus" in s["patch"].get("resources", {})]
    assert sharded and all(s["patch"]["resources"]["num_gpus"] <= 8 for s in sharded)


@pytest.fixture()
def two_gpu_worker():
    with live_worker("scope-2gpu", 2):
        yield


def test_more_gpus_than_any_live_worker_has_is_refused(api, tiny_model, data_root, two_gpu_worker):
    (data_root / "scope.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    spec = {
        "base_model": str(tiny_model),
        "method": "lora",
        "dataset": {"path": "scope.jsonl"},
        "training": {"max_seq_length": 64},
        "resources": {"num_gpus": 4},
    }
    before = job_count()
    body = assert_problem(api.post("/v1/jobs", json=spec), 422, "not_enough_gpus")
    assert "the largest live worker has 2 GPU(s)" in body["detail"] and body["max_num_gpus"] == 2
    assert job_count() == before  # nothing queued that no worker could ever take
