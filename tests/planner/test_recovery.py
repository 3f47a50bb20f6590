"""Out-of-memory recovery (planner/recovery.py): the ladder of changes, cheapest first, each keeping the effective
batch; and the choice against a GPU, with the prediction scaled by how far the failed attempt's measured peak
passed it."""

from __future__ import annotations

import pytest

from domain.spec import JobSpec
from planner import plan
from planner.catalog import find_model
from planner.recovery import ladder, recover

Q7 = find_model("Qwen/Qwen2.5-7B")
GIB = 2**30


def make_spec(micro_batch_size: int = 4, accumulation: int = 1, **memory) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base_model": "Qwen/Qwen2.5-7B",
            "dataset": {"path": "d.jsonl"},
            "method": "qlora",
            "training": {
                "micro_batch_size": micro_batch_size,
                "gradient_accumulation_steps": accumulation,
                "max_seq_length": 2048,
            },
            "memory": memory,
        }
    )


def test_the_ladder_is_smaller_micro_batches_then_checkpointing_fused_loss_and_paging():
    spec = make_spec(4, 2, gradient_checkpointing=False, fused_loss=False, optimizer="adamw_8bit")
    assert ladder(spec) == [
        {"training.micro_batch_size": [4, 2], "training.gradient_accumulation_steps": [2, 4]},
        {"training.micro_batch_size": [4, 1], "training.gradient_accumulation_steps": [2, 8]},
        {"memory.gradient_checkpointing": [False, True]},
        {"memory.fused_loss": [False, True]},
        {"memory.optimizer": ["adamw_8bit", "paged_adamw_8bit"]},
    ]


@pytest.mark.parametrize(
    ("micro_batch_size", "smaller"),
    [(6, [3, 2, 1]), (3, [1]), (8, [4, 2, 1]), (1, [])],
)
def test_a_micro_batch_shrinks_only_to_its_divisors_so_the_effective_batch_is_exact(micro_batch_size, smaller):
    rungs = [rung for rung in ladder(make_spec(micro_batch_size, 3)) if "training.micro_batch_size" in rung]
    assert [rung["training.micro_batch_size"][1] for rung in rungs] == smaller
    for rung in rungs:
        after_micro, after_accumulation = (rung[f][1] for f in rung)
        assert after_micro * after_accumulation == micro_batch_size * 3


def test_nothing_is_left_once_every_rung_is_taken():
    spec = make_spec(1, 4, gradient_checkpointing=True, fused_loss=True, optimizer="paged_adamw_8bit")
    assert ladder(spec) == [] and recover(spec, Q7, 80 * GIB) is None


def test_without_a_gpu_the_first_rung_is_taken():
    recovery = recover(make_spec(8), Q7, None)
    assert recovery.changes["training.micro_batch_size"] == [8, 4]
    assert recovery.spec.training.gradient_accumulation_steps == 2
    assert recovery.description == (
        "micro_batch_size 8 -> 4, gradient_accumulation_steps 1 -> 2 (the effective batch stays 8 rows per rank)"
    )


def test_the_largest_micro_batch_that_fits_the_measured_underestimate_wins():
    gpu = 18 * GIB  # qlora 7B at 2048 tokens: micro-batch 8 predicted 15.8 GiB, 4 11.4, 2 9.9, 1 9.4; margin 1 GiB
    spec = make_spec(8)
    predicted = {size: plan(make_spec(size, 8 // size), Q7, gpu).peak_vram_bytes for size in (8, 4, 2, 1)}
    margin = plan(spec, Q7, gpu).safety_margin_bytes
    # The plan believed micro-batch 8 fits; it did not. As predicted, 4 fits:
    assert predicted[4] + margin <= gpu
    assert (
        recover(
            spec, Q7, gpu, measured_peak_bytes=None, predicted_peak_bytes=predicted[8]
        ).spec.training.micro_batch_size
        == 4
    )
    # A measured peak 1.5x the prediction scales every candidate's: the largest that fits even so is chosen.
    underestimate = 1.5
    expected = next(size for size in (4, 2, 1) if predicted[size] * underestimate + margin <= gpu)
    recovery = recover(spec, Q7, gpu, int(predicted[8] * underestimate), predicted[8])
    assert recovery.spec.training.micro_batch_size == expected < 4
    assert recovery.plan.peak_vram_bytes == predicted[expected]


def test_a_measured_peak_below_the_prediction_never_loosens_the_check():
    gpu, spec = 24 * GIB, make_spec(8)
    predicted = plan(spec, Q7, gpu).peak_vram_bytes
    lower = recover(spec, Q7, gpu, predicted // 2, predicted)
    assert lower.spec == recover(spec, Q7, gpu, None, predicted).spec
