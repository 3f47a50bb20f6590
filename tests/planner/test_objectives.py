"""Preference objectives in the planner (planner/objectives.py): every term they add, against hand-computed values
(arithmetic in the comments), the registry against the spec, and the reference suggestions.

Qwen2.5-0.5B: hidden 896, q 896, kv 128, intermediate 4864, 24 layers, vocab 151,936, tied embeddings, qkv bias.
Unless a test says otherwise: micro_batch_size 4, max_seq_length 1024, bf16-mixed, gradient checkpointing on, the
worker's fused loss (chunks of 1024 positions).
"""

from __future__ import annotations

from typing import get_args

import pytest

from domain.spec import JobSpec, Objective, Reference
from planner import plan
from planner import terms as t
from planner.catalog import find_model
from planner.core import WORKER, build_setup
from planner.objectives import OBJECTIVES, REFERENCES
from planner.suggest import _candidates

Q05 = find_model("Qwen/Qwen2.5-0.5B")
MB, SEQ, VOCAB, HIDDEN = 4, 1024, 151_936, 896
FORMATS = {"sft": "alpaca", "dpo": "preference", "orpo": "preference", "kto": "kto"}

# The fused loss at T tokens (terms.fused_loss_bytes): 3 fp32 chunk x vocab buffers + the gathered bf16 hidden states
CHUNK_FP32 = 1024 * VOCAB * 4  # 622,329,856


def fused(tokens: int) -> int:
    return 3 * CHUNK_FP32 + tokens * HIDDEN * 2


# One decoder layer of a no-grad forward, per token, no adapters, padded rows (a mask, so k/v are repeated to the 14
# query heads): 2 RMSNorms' fp32 upcast 2 x 4 x 896 = 7,168; sdpa's q, k, v, out 2 x 4 x 896 = 7,168; the gated
# MLP's gate, up, act(gate) 3 x 2 x 4864 = 29,184.
NO_GRAD_LAYER_PER_TOKEN = 7_168 + 7_168 + 29_184  # 43,520


def no_grad_layer(tokens: int) -> int:
    """+ sdpa's bf16 additive mask [rows, 1, seq, seq] (2 B) and the bool mask itself (1 B)."""
    return tokens * NO_GRAD_LAYER_PER_TOKEN + tokens * SEQ * (2 + 1)


def spec(objective: str = "sft", method: str = "lora", **body) -> JobSpec:
    training = {"micro_batch_size": MB, "max_seq_length": SEQ} | body.pop("training", {})
    return JobSpec.model_validate(
        {"base_model": Q05.name, "method": method, "objective": objective, "dataset_format": FORMATS[objective],
         "training": training, **body}
    )  # fmt: skip


def phases(s: JobSpec) -> dict[str, dict[str, int]]:
    return plan(s, Q05).phases


# ---- the registry ---------------------------------------------------------------------------------------------
def test_the_registry_covers_the_enum_and_says_which_objectives_have_a_reference():
    assert set(OBJECTIVES) == set(Objective)
    with_reference = {o for o, traits in OBJECTIVES.items() if traits.has_reference}
    assert with_reference == {o for o in Objective if o.needs_reference}
    assert set(REFERENCES) == set(get_args(Reference))
    for traits in REFERENCES.values():
        assert set(traits.alternatives) <= set(REFERENCES) and traits.per_step != traits.precomputes


def test_setup_carries_the_entries_of_its_objective_and_reference():
    s = build_setup(spec("dpo", "full", dpo={"reference": "copy"}), Q05, MB, WORKER)
    assert s.objective_traits is OBJECTIVES[Objective.dpo] and s.reference_traits is REFERENCES["copy"]
    assert build_setup(spec("orpo"), Q05, MB, WORKER).reference_traits is None
    assert build_setup(spec("kto", "full"), Q05, MB, WORKER).reference_traits is REFERENCES["precomputed"]


# ---- sft: unchanged --------------------------------------------------------------------------------------------
def test_sft_keeps_one_row_per_example_and_its_four_phases():
    s = build_setup(spec(), Q05, MB, WORKER)
    assert s.tokens == MB * SEQ == 4096 and t.example_tokens(s) == 4096
    assert list(phases(spec())) == ["forward_loss", "loss_backward", "layer_backward", "optimizer_step"]
    assert t.reference_weight_bytes(Q05, s) == 0 and t.reference_cast_bytes(Q05, s) == 0


# ---- dpo / orpo: both sequences in one forward -----------------------------------------------------------------
@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_chosen_and_rejected_run_in_one_forward_of_twice_the_rows(objective):
    s = build_setup(spec(objective), Q05, MB, WORKER)
    assert s.tokens == 2 * MB * SEQ == 8192 and t.example_tokens(s) == 4096
    forward = phases(spec(objective))["forward_loss"]
    assert forward["activations"] == 24 * 8192 * HIDDEN * 2 == 352_321_536  # each layer's bf16 input, 8 rows
    assert forward["attention_mask"] == 8192 * SEQ == 8_388_608  # bool [8, 1, 1024, 1024]
    # both sequences' learned positions go through the fused loss: 3 x 622,329,856 + 8192 x 896 x 2 = 14,680,064
    assert forward["logits_loss"] == fused(8192) == 1_881_669_632


def test_orpo_has_no_reference_and_only_the_policys_phases():
    assert list(phases(spec("orpo"))) == ["forward_loss", "loss_backward", "layer_backward", "optimizer_step"]


def test_dpo_with_its_adapters_off_scores_both_sequences_again_under_no_grad():
    every = phases(spec("dpo"))
    assert list(every) == ["forward_loss", "reference_forward", "loss_backward", "layer_backward", "optimizer_step"]
    ref, forward = every["reference_forward"], every["forward_loss"]
    # the policy's saved tensors wait for its backward: the layer inputs, the mask, the fused loss's gathered hidden
    assert ref["activations"] == forward["activations"] and ref["attention_mask"] == forward["attention_mask"]
    assert ref["policy_logps_saved"] == 8192 * HIDDEN * 2 == 14_680_064
    # 8 rows, no adapters (peft's disable_adapter): 8192 x 43,520 + 8192 x 1024 x 3 = 356,515,840 + 25,165,824
    assert ref["reference_layer_working_set"] == no_grad_layer(8192) == 381_681_664
    assert ref["reference_logits"] == fused(8192) == 1_881_669_632
    assert "logits_loss" not in ref and "reference_weights" not in ref
    # the allocator: 4% of what is allocated, 0.8 of the reference's fp32 chunk, 0.4 of the adapters' grads' pool
    allocated = sum(v for k, v in ref.items() if k not in ("allocator_fragmentation", "cuda_context"))
    pool = t.trainable_numel(t.trainable_tensors(Q05, build_setup(spec("dpo"), Q05, MB, WORKER))) * 4
    assert ref["allocator_fragmentation"] == int(0.04 * allocated + 0.8 * CHUNK_FP32 + 0.4 * pool)


def test_the_unfused_path_keeps_log_softmax_of_both_sequences_while_the_reference_runs():
    ref = phases(spec("dpo", memory={"fused_loss": False}))["reference_forward"]
    logits_fp32 = 8192 * VOCAB * 4  # 4,978,638,848
    assert ref["policy_logps_saved"] == logits_fp32 == 4_978_638_848
    # the reference's bf16 logits, their .float() copy and log_softmax's output, all [8, 1024, 151936]
    assert ref["reference_logits"] == 8192 * VOCAB * 2 + 2 * logits_fp32 == 12_446_597_120


# Qwen2.5-0.5B's parameters: per layer 14,909,440 projection weights (q, o 896x896; k, v 896x128; gate, up 4864x896;
# down 896x4864) + 1,152 qkv biases + 2 x 896 norms = 14,912,384; x 24 = 357,897,216; + the tied embedding
# 136,134,656 + the final norm 896 = 494,032,768.
Q05_PARAMS = 494_032_768


def test_a_copied_reference_holds_the_fp32_model_again_and_casts_its_lm_head():
    every = phases(spec("dpo", "full", dpo={"reference": "copy"}))
    for terms in every.values():  # the copy lives for the whole run
        assert terms["reference_weights"] == Q05_PARAMS * 4 == 1_976_131_072  # full under bf16-mixed: fp32
    ref = every["reference_forward"]
    # the frozen fp32 copy under autocast: its lm_head cast to bf16 at the logits (not cached: no grad required)
    assert ref["reference_autocast_weight_copies"] == VOCAB * HIDDEN * 2 == 272_269_312
    # the policy's cached bf16 copies of its trainable fp32 weights stay until the autocast region (the whole loss)
    # exits: 2 x (24 x 14,909,440 + 136,134,656)
    assert ref["autocast_weight_copies"] == 2 * (24 * 14_909_440 + 136_134_656) == 987_922_432
    assert ref["reference_layer_working_set"] == no_grad_layer(8192)  # fp32 residuals: norms upcast all the same
    freeze = phases(spec("dpo", "freeze", dpo={"reference": "copy"}))["optimizer_step"]
    # freeze's last 2 layers train in fp32, the other 22 and the head stay bf16: the copy keeps each dtype
    assert freeze["reference_weights"] == 2 * 14_912_384 * 4 + (22 * 14_912_384 + 136_134_656 + 896) * 2


def test_a_precomputed_reference_is_a_phase_before_step_1_with_no_optimizer_state():
    every = phases(spec("dpo", "full"))  # full resolves to precomputed
    assert list(every)[0] == "reference_precompute" and "reference_forward" not in every
    pre = every["reference_precompute"]
    assert "optimizer_states" not in pre and "gradients" not in pre and "activations" not in pre
    assert {"weights", "master_weights", "misc_workspaces"} <= set(pre)
    assert pre["weights"] + pre["master_weights"] == Q05_PARAMS * 4  # the model as loaded, fp32
    assert pre["reference_layer_working_set"] == no_grad_layer(8192) and pre["reference_logits"] == fused(8192)
    # autocast caches the bf16 copies of fp32 weights that require grad under no_grad too
    assert pre["autocast_weight_copies"] == 987_922_432
    allocated = sum(v for k, v in pre.items() if k not in ("allocator_fragmentation", "cuda_context"))
    # no freed grads or optimizer temporaries yet: only the autocast copies are in the allocator's pool
    assert pre["allocator_fragmentation"] == int(0.04 * allocated + 0.8 * CHUNK_FP32 + 0.4 * 987_922_432)
    # after it, a step is orpo's: the same policy rows and no reference
    orpo = phases(spec("orpo", "full"))
    assert {name: every[name] for name in orpo} == orpo


# ---- kto: the completion with grad, the mismatched rows without, the reference over both -------------------------
LORA = {"r": 16, "target_modules": ["q_proj", "v_proj"], "dropout": 0.1}


def test_kto_runs_its_mismatched_rows_through_the_policy_then_both_through_the_reference():
    every = phases(spec("kto", lora=LORA))
    assert list(every)[:3] == ["forward_loss", "mismatched_forward", "reference_forward"]
    assert build_setup(spec("kto", lora=LORA), Q05, MB, WORKER).tokens == 4096  # one row per example with grad
    mismatched, ref = every["mismatched_forward"], every["reference_forward"]
    assert mismatched["policy_logps_saved"] == ref["policy_logps_saved"] == 4096 * HIDDEN * 2 == 7_340_032
    # the mismatched rows run with the adapters on: per adapted q/v projection, dropout's output (1 B mask) and
    # lora_A's bf16 input (2 B) of 896 features, and lora_B's r-wide input: 2 x (3 x 896 + 2 x 16) = 5,440
    per_token = NO_GRAD_LAYER_PER_TOKEN + 2 * (3 * 896 + 2 * 16)
    assert mismatched["mismatched_layer_working_set"] == 4096 * per_token + 4096 * SEQ * 3 == 213_123_072
    assert mismatched["mismatched_logits"] == fused(4096) == 1_874_329_600
    # the reference scores the completion and the mismatched row of every example: 8 rows, adapters off
    assert ref["reference_layer_working_set"] == no_grad_layer(8192) == 381_681_664
    assert ref["reference_logits"] == fused(8192)


def test_kto_with_a_precomputed_reference_keeps_only_its_mismatched_forward_per_step():
    every = phases(spec("kto", "full"))
    assert list(every)[:3] == ["reference_precompute", "forward_loss", "mismatched_forward"]
    assert "reference_forward" not in every
    assert every["reference_precompute"]["reference_logits"] == fused(8192)


def test_auto_micro_batch_sizes_the_doubled_rows():
    gpu = 24 * 2**30
    body = {"training": {"micro_batch_size": "auto", "max_seq_length": 4096}, "memory": {"fused_loss": False}}
    sft, orpo = plan(spec(**body), Q05, gpu), plan(spec("orpo", **body), Q05, gpu)
    assert orpo.micro_batch_size < sft.micro_batch_size and orpo.fits and sft.fits


# ---- suggestions -----------------------------------------------------------------------------------------------
def test_a_copy_that_does_not_fit_is_offered_a_precomputed_reference():
    copied = spec("dpo", "full", dpo={"reference": "copy"})
    precomputed = plan(spec("dpo", "full", dpo={"reference": "precomputed"}), Q05)
    gpu = precomputed.peak_vram_bytes + int(1.5 * 2**30)  # the 1 GiB margin floor + 0.5 GiB: the copy needs more
    advice = plan(copied, Q05, gpu)
    assert advice.fits is False
    first = advice.suggestions[0]
    assert first.description.startswith("dpo.reference copy→precomputed")
    assert first.patch == {"dpo": {"reference": "precomputed"}} and first.peak_vram_bytes == precomputed.peak_vram_bytes


def test_switching_a_copy_to_lora_turns_the_reference_into_the_adapters_base():
    patches = {d.split(" (")[0]: p for _, d, p in _candidates(spec("dpo", "full", dpo={"reference": "copy"}), Q05, MB)}
    assert patches["method full→lora, dpo.reference copy→adapter_disabled"] == {
        "method": "lora",
        "freeze": None,
        "dpo": {"reference": "adapter_disabled"},
    }
    described = [d for _, d, _ in _candidates(spec("kto"), Q05, MB)]
    assert any(d.startswith("kto.reference adapter_disabled→precomputed") for d in described)
    assert not any(".reference" in d for _, d, _ in _candidates(spec("orpo"), Q05, MB))
