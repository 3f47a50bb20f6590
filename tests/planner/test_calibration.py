"""The learned correction (planner/calibration.py): when it appears, how far it may move a plan, and how the
plan shows it. Ratios are hand-picked so the nearest-rank 90th percentile is easy to read off."""

from __future__ import annotations

import pytest

from domain.spec import JobSpec
from planner import plan
from planner.calibration import (
    LEARNED_CORRECTION_TERM,
    MIN_JOBS,
    Correction,
    accuracy,
    correction,
    recipe_family,
)
from planner.catalog import find_model

GIB = 2**30
Q7 = find_model("Qwen/Qwen2.5-7B")
GPU = "NVIDIA H100 80GB HBM3"


def spec(**body) -> JobSpec:
    return JobSpec.model_validate({"base_model": "Qwen/Qwen2.5-7B", **body})


def samples(*ratios: float, predicted: int = 10 * GIB) -> list[tuple[int, int]]:
    return [(predicted, round(predicted * ratio)) for ratio in ratios]


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ((1.2,) * (MIN_JOBS - 1), None),  # below the minimum count: no correction, however clear
        ((1.04, 1.02, 1.03, 1.05, 1.01), 1.05),  # under 10 jobs the 90th percentile is the largest ratio
        ((1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.08, 1.09, 1.50), 1.09),  # one outlier in ten does not decide
        ((0.90, 0.95, 0.97, 0.99, 1.00), None),  # the model over-predicts: a plan never shrinks
        ((0.80, 0.85, 0.90, 0.95, 1.02), 1.02),  # mostly over, one under: still never below 1, and only as far
    ],
)
def test_correction_table(ratios, expected):
    found = correction(samples(*ratios), GPU, "f")
    if expected is None:
        assert found is None
        return
    assert found is not None and found.jobs == len(ratios)
    assert found.ratio == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "ratios",
    [(1.3, 1.1, 1.2, 1.25, 1.15), (1.001,) * 7 + (3.0,), tuple(1 + i / 100 for i in range(40))],
)
def test_correction_never_shrinks_and_never_passes_the_largest_measured_ratio(ratios):
    found = correction(samples(*ratios), GPU, "f")
    assert found is not None
    assert 1.0 <= found.ratio <= max(ratios) + 1e-9


def test_zero_or_missing_peaks_are_not_measurements():
    assert correction([(0, 5)] * 10 + [(5, 0)] * 10, GPU, "f") is None


def test_accuracy_reports_the_median_and_the_error_furthest_from_zero():
    measured = accuracy(samples(1.10, 0.70, 1.05, 1.02))
    assert measured is not None and measured.jobs == 4
    assert measured.median_error_ratio == pytest.approx((0.02 + 0.05) / 2)
    assert measured.worst_error_ratio == pytest.approx(-0.30)  # an over-prediction can be the worst
    assert accuracy([]) is None


@pytest.mark.parametrize(
    ("body", "family"),
    [
        ({}, "qlora-4bit/adamw/gc/sft"),
        ({"quantization": {"bits": 8}}, "qlora-8bit/adamw/gc/sft"),
        ({"method": "lora", "memory": {"optimizer": "paged_adamw_8bit"}}, "lora/paged_adamw_8bit/gc/sft"),
        ({"method": "full", "memory": {"gradient_checkpointing": False}}, "full/adamw/no-gc/sft"),
        ({"method": "full", "resources": {"num_gpus": 2}}, "full/adamw/gc/sft/zero3"),
        (
            {"method": "lora", "objective": "dpo", "dataset_format": "preference"},
            "lora/adamw/gc/dpo",
        ),
    ],
)
def test_recipe_family(body, family):
    assert recipe_family(spec(**body)) == family


def test_a_plan_without_a_correction_is_the_models_and_says_nothing_of_one():
    alone = plan(spec(), Q7, 24 * GIB)
    assert alone.learned_correction is None
    assert LEARNED_CORRECTION_TERM not in alone.breakdown
    assert "learned_correction" not in alone.model_dump(mode="json")  # stored plans are unchanged


def test_the_correction_is_its_own_breakdown_line_in_every_phase():
    s = spec()
    alone = plan(s, Q7, 24 * GIB)
    corrected = plan(s, Q7, 24 * GIB, correction=Correction(1.08, 12, GPU, recipe_family(s)))
    line = corrected.breakdown[LEARNED_CORRECTION_TERM]
    assert line == round(alone.peak_vram_bytes * 0.08)
    assert corrected.peak_vram_bytes == alone.peak_vram_bytes + line == sum(corrected.breakdown.values())
    assert corrected.phases[corrected.peak_phase] == corrected.breakdown
    assert corrected.headroom_bytes == alone.headroom_bytes - line
    learned = corrected.learned_correction
    assert learned is not None
    assert (learned.jobs, learned.gpu_model, learned.family) == (12, GPU, "qlora-4bit/adamw/gc/sft")
    assert learned.model_peak_vram_bytes == alone.peak_vram_bytes


def test_auto_micro_batch_is_sized_so_the_corrected_peak_fits():
    s = spec(training={"micro_batch_size": "auto"})
    gpu = 24 * GIB
    alone = plan(s, Q7, gpu)
    corrected = plan(s, Q7, gpu, correction=Correction(1.2, 5, GPU, recipe_family(s)))
    assert corrected.micro_batch_size < alone.micro_batch_size
    assert corrected.fits and corrected.peak_vram_bytes + corrected.safety_margin_bytes <= gpu


def test_suggestions_of_a_corrected_plan_fit_once_corrected():
    s = spec(method="lora", training={"micro_batch_size": 8})
    gpu = 24 * GIB
    corrected = plan(s, Q7, gpu, correction=Correction(1.2, 6, GPU, recipe_family(s)))
    assert corrected.fits is False and corrected.suggestions
    for suggestion in corrected.suggestions:
        assert suggestion.peak_vram_bytes + corrected.safety_margin_bytes <= gpu
        assert suggestion.headroom_bytes == gpu - corrected.safety_margin_bytes - suggestion.peak_vram_bytes


def test_a_correction_of_another_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        plan(spec(), Q7, 24 * GIB, correction=Correction(1.1, 5, GPU, "full/adamw/gc/sft"))
