"""BAdam's plan for Llama-2-7B full fine-tuning, term by term against a hand count, and its place among the
suggestions when full AdamW does not fit."""

from __future__ import annotations

from domain.spec import JobSpec
from planner import plan
from planner.catalog import find_model

GIB = 2**30
LLAMA2_7B = find_model("meta-llama/llama-2-7b-hf")


def full_spec(optimizer: str, **extra) -> JobSpec:
    return JobSpec.model_validate(
        {
            "base_model": "meta-llama/llama-2-7b-hf",
            "method": "full",
            "training": {"micro_batch_size": 1, "max_seq_length": 512},
            "memory": {"optimizer": optimizer, "precision": "bf16-mixed", "gradient_checkpointing": True},
            **extra,
        }
    )


def test_llama2_7b_badam_peak_is_a_hand_count_and_far_below_full_adamw():
    # Llama-2-7B by hand: hidden 4096, MLP 11008, 32 layers, vocab 32000, untied lm_head, 2 RMSNorms a layer.
    h, i, layers, vocab = 4096, 11008, 32, 32000
    layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two norms: 202,383,360
    model = layers * layer + 2 * vocab * h + h  # + embeddings, lm_head, final norm: 6,738,415,616
    weights = 2 * model  # all of it in bf16
    master = 4 * layer  # the active block's fp32 copies
    states = 8 * layer  # Adam's exp_avg and exp_avg_sq in fp32
    step_grads = 4 * layer  # at the step the block's grads are fp32 (badam _grad_to_hp)
    misc, context = 110 * 2**20, 794_820_608
    allocated = weights + master + states + step_grads + misc
    hand = allocated + int(0.04 * allocated) + context  # + 4% allocator slack, the CUDA context

    badam = plan(full_spec("badam"), LLAMA2_7B, 24 * GIB)
    assert badam.peak_phase == "optimizer_step"
    assert badam.breakdown["weights"] == weights and badam.breakdown["master_weights"] == master
    assert badam.breakdown["optimizer_states"] == states and badam.breakdown["gradients"] == step_grads
    assert badam.peak_vram_bytes == hand  # 17.04 GiB
    assert badam.fits  # on a 24 GiB GPU

    adamw = plan(full_spec("adamw"), LLAMA2_7B, 24 * GIB)
    assert adamw.peak_vram_bytes > 6 * badam.peak_vram_bytes  # 107.4 GiB: fp32 weights, grads and states of all
    assert not adamw.fits


def test_full_adamw_that_does_not_fit_is_offered_badam():
    adamw = plan(full_spec("adamw"), LLAMA2_7B, 24 * GIB)
    offered = {s.description.split(" (")[0]: s for s in adamw.suggestions}
    assert "optimizer adamw→badam" in offered
    assert offered["optimizer adamw→badam"].patch == {"memory": {"optimizer": "badam"}}
    assert (
        offered["optimizer adamw→badam"].peak_vram_bytes
        == plan(full_spec("badam"), LLAMA2_7B, 24 * GIB).peak_vram_bytes
    )


def test_badam_is_not_offered_where_the_spec_cannot_run_it():
    """lora, or fp16-mixed: the patched spec is invalid, so the suggestion is skipped, not offered broken."""
    for body in ({"method": "lora"}, {"memory": {"precision": "fp16-mixed", "optimizer": "adamw"}}):
        spec = full_spec("adamw").model_copy(update={})
        spec = JobSpec.model_validate({**spec.model_dump(exclude_none=True), **body})
        offered = [s.description for s in plan(spec, LLAMA2_7B, 24 * GIB).suggestions]
        assert not any("badam" in d for d in offered), offered


def test_more_layers_per_block_cost_their_masters_states_and_grads():
    one = plan(full_spec("badam"), LLAMA2_7B, 80 * GIB)
    four = plan(full_spec("badam", badam={"layers_per_block": 4}), LLAMA2_7B, 80 * GIB)
    for term in ("master_weights", "optimizer_states", "gradients"):
        assert four.breakdown[term] == 4 * one.breakdown[term]
