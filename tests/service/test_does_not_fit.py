"""A job the planner says cannot fit is refused with its plan, and nothing reaches the queue."""

from __future__ import annotations

from sqlalchemy import func, select

from service.db import transaction
from service.models import Job


def test_7b_full_fine_tune_on_1_gib_is_refused(api, redis_client, settings):
    spec = {
        "base_model": "Qwen/Qwen2.5-7B",  # planned offline from the catalog; never downloaded
        "dataset": {"path": "whatever.jsonl"},
        "method": "full",
        "resources": {"gpu_memory_gib": 1},
    }
    with transaction() as session:
        jobs_before = session.scalar(select(func.count(Job.seq)))
    response = api.post("/v1/jobs", json=spec)

    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "does_not_fit"
    plan = body["plan"]
    assert plan["fits"] is False
    assert plan["peak_vram_bytes"] > 7e9 * 2  # at least the bf16 weights of 7B parameters
    assert sum(plan["breakdown"].values()) >= plan["peak_vram_bytes"] * 0.9
    assert plan["gpu_memory_bytes"] == 1024**3
    assert redis_client.llen(settings.queue_name) == 0
    with transaction() as session:
        assert session.scalar(select(func.count(Job.seq))) == jobs_before


def test_dry_run_plan_offers_fixes_that_fit(api):
    spec = {
        "base_model": "meta-llama/Llama-3.1-8B",
        "method": "lora",
        "training": {"micro_batch_size": 8, "max_seq_length": 4096},
        "memory": {"gradient_checkpointing": False},
        "resources": {"gpu_memory_gib": 24},
    }
    response = api.post("/v1/plans", json=spec)
    assert response.status_code == 200, response.text
    plan = response.json()
    assert plan["fits"] is False
    assert plan["suggestions"], plan
    for suggestion in plan["suggestions"]:
        assert suggestion["peak_vram_bytes"] + plan["safety_margin_bytes"] <= 24 * 1024**3
        assert suggestion["patch"]
