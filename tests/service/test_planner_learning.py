"""The planner learns from finished jobs: measured peaks recorded through the worker's own success path
(attempts.finish), then a correction in the breakdown once enough jobs agree, bounded by what they measured,
and the admin-only accuracy report."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import delete

from domain.states import JobStatus
from planner.calibration import MIN_JOBS
from service.calibration import repository as calibration
from service.calibration.repository import MeasuredPeak
from service.db import transaction
from service.jobs import attempts, repository
from service.models import PlannerMeasurement

GIB = 1024**3
# A size no real GPU has, so this test's GPU is the only one a plan against it can match.
GPU_GIB = 333
FAMILY = "lora/adamw/gc/sft"
# Nearest-rank 90th percentile of ten: the ninth smallest, 1.10; the 1.40 outlier does not set the correction.
RATIOS = (1.05, 1.10, 1.02, 1.08, 1.04, 1.06, 1.03, 1.07, 1.09, 1.40)


@pytest.fixture()
def gpu_model():
    """A live GPU of a model of its own, and no measurements of it left behind."""
    model, hostname = f"NVIDIA Learning Test {uuid.uuid4().hex[:6]}", f"learning-{uuid.uuid4().hex[:6]}@host"
    with transaction() as session:
        repository.register_gpus(session, hostname, [(0, model, GPU_GIB * GIB)])
    yield model
    with transaction() as session:
        repository.unregister_gpus(session, hostname)
        session.execute(delete(PlannerMeasurement).where(PlannerMeasurement.gpu_model == model))


@pytest.fixture()
def job_spec(tiny_model, data_root) -> dict:
    (data_root / "learning.jsonl").write_text(json.dumps({"text": "a row"}) + "\n")
    return {
        "base_model": str(tiny_model),
        "dataset": {"path": "learning.jsonl"},
        "dataset_format": "text",
        "method": "lora",
        "training": {"max_steps": 1, "max_seq_length": 32},
        "resources": {"gpu_memory_gib": GPU_GIB},
    }


def run_to_success(store_queued_job, job_spec: dict, gpu_model: str, ratio: float) -> int:
    """A job stored as POST /v1/jobs does, claimed and finished as a worker does, measuring `ratio` times the
    model's peak (a job planned once a correction exists carries it on top); returns its planned peak."""
    job_id = store_queued_job(job_spec)
    with transaction() as session:
        fence = attempts.claim(session, job_id, "learning@host", lease_seconds=60)
        job = repository.get_job(session, job_id)
        planned, plan = job.predicted_peak_bytes, job.plan
    measured = round(plan.get("learned_correction", {}).get("model_peak_vram_bytes", planned) * ratio)
    with transaction() as session:
        assert attempts.finish(
            session,
            fence,
            JobStatus.succeeded,
            "succeeded",
            artifacts=[],
            measured_peak_bytes=measured,
            measured=MeasuredPeak(gpu_model, "570.1", {"torch": "2.x"}, "llama", measured),
        )
    return planned


def test_measured_peaks_become_a_bounded_correction_and_an_accuracy_report(
    api, store_queued_job, job_spec, gpu_model, make_key
):
    before = api.post("/v1/plans", json=job_spec).json()
    assert "learned_correction" not in before and "learned_correction" not in before["breakdown"]
    for ratio in RATIOS[: MIN_JOBS - 1]:
        run_to_success(store_queued_job, job_spec, gpu_model, ratio)
    assert "learned_correction" not in api.post("/v1/plans", json=job_spec).json()  # too few jobs yet

    for ratio in RATIOS[MIN_JOBS - 1 :]:
        run_to_success(store_queued_job, job_spec, gpu_model, ratio)
    after = api.post("/v1/plans", json=job_spec).json()
    learned = after["learned_correction"]
    assert (learned["jobs"], learned["gpu_model"], learned["family"]) == (len(RATIOS), gpu_model, FAMILY)
    assert learned["ratio"] == pytest.approx(1.10, abs=1e-6)  # >= 1, and no further than the jobs measured
    assert 1.0 <= learned["ratio"] <= max(RATIOS)
    line = after["breakdown"]["learned_correction"]
    assert learned["model_peak_vram_bytes"] == before["peak_vram_bytes"]  # the model's own figure is kept
    assert line == round(before["peak_vram_bytes"] * (learned["ratio"] - 1))
    assert after["peak_vram_bytes"] == before["peak_vram_bytes"] + line == sum(after["breakdown"].values())

    # A job planned with the correction is measured against the model's peak, so corrections never compound.
    corrected_plan = run_to_success(store_queued_job, job_spec, gpu_model, 1.0)
    assert corrected_plan == after["peak_vram_bytes"]
    with transaction() as session:
        newest_predicted, _ = calibration.samples(session, gpu_model, FAMILY)[0]
    assert newest_predicted == before["peak_vram_bytes"]

    report = api.get("/v1/planner/accuracy")
    assert report.status_code == 200, report.text
    (row,) = [r for r in report.json()["data"] if r["gpu_model"] == gpu_model]
    errors = sorted([r - 1 for r in RATIOS] + [0.0])
    assert (row["family"], row["jobs"]) == (FAMILY, len(RATIOS) + 1)
    assert row["median_error_ratio"] == pytest.approx(errors[len(errors) // 2], abs=1e-6)
    assert row["worst_error_ratio"] == pytest.approx(0.40, abs=1e-6)
    assert row["correction_ratio"] == pytest.approx(1.10, abs=1e-6)

    metrics = api.get("/metrics").text
    assert f'ftjobs_planner_error_ratio{{family="{FAMILY}",gpu_model="{gpu_model}",stat="worst"}}' in metrics


def test_the_accuracy_report_needs_an_admin_key(api, make_key):
    tenant = make_key(f"learning-{uuid.uuid4().hex[:6]}")
    response = api.get("/v1/planner/accuracy", headers=tenant.headers)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "admin_only"


def test_a_success_without_a_gpu_measurement_records_nothing(store_queued_job, job_spec, gpu_model):
    """On a CPU worker worker/measurements.py gives no measurement: the success is recorded, no sample is."""
    job_id = store_queued_job(job_spec)
    with transaction() as session:
        fence = attempts.claim(session, job_id, "learning@host", lease_seconds=60)
    with transaction() as session:
        assert attempts.finish(session, fence, JobStatus.succeeded, "succeeded", artifacts=[], measured=None)
    with transaction() as session:
        assert repository.get_job(session, job_id).status == "succeeded"
        assert calibration.samples(session, gpu_model, FAMILY) == []
