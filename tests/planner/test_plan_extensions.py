"""Planner terms and spec rules of the newer options: 4-bit / CPU-offloaded optimizers, int8 and FP4 qlora,
packing, fused_loss's default, freeze.trainable_modules. Hand-computed values in the comments."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from domain.spec import JobSpec
from planner import plan
from planner import terms as t
from planner.catalog import find_model
from planner.core import HF_TRAINER, WORKER, apply_patch, build_setup, estimate, freeze_module_tensors

Q05 = find_model("Qwen/Qwen2.5-0.5B")  # hidden 896, q 896, kv 128, intermediate 4864, 24 layers, tied, qkv bias


def setup_for(body: dict, mb: int = 4, recipe=WORKER) -> t.Setup:
    return build_setup(JobSpec.model_validate({"base_model": Q05.name, **body}), Q05, mb, recipe)


# ---- optimizers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tensors, expected",
    [
        # per state: 1,048,576 / 2 codes = 524,288 + 8,192 blocks x 4 B = 32,768 + qmap 64 = 557,120; two states
        ([(1_048_576, 1)], 1_114_240),
        ([(2048, 3)], 3 * 2048 * 2 * 4),  # under 4096 elements: zeros_like(fp32 param), two states
        ([(4100, 1)], 4100 * 2 * 4),  # 4100 % 128 != 0: full precision too
    ],
)
def test_adamw_4bit_states(tensors, expected):
    s = setup_for({"method": "lora", "memory": {"optimizer": "adamw_4bit"}})
    assert t.optimizer_state_bytes(tensors, s) == (expected, 0)
    assert t.optimizer_temp_bytes(tensors, s, foreach_adamw=True) == 0


def test_cpu_offload_keeps_only_small_tensors_states_on_the_gpu():
    s = setup_for({"method": "lora", "memory": {"optimizer": "cpu_offload"}})
    assert t.optimizer_state_bytes([(1_000_000, 2), (2048, 3)], s) == (3 * 2048 * 8, 0)  # 49,152


def test_cpu_offload_gradients_leave_the_gpu_without_accumulation():
    tensors = [(1_000_000, 2), (2048, 3)]
    offloaded = setup_for({"method": "lora", "memory": {"optimizer": "cpu_offload"}})
    assert offloaded.offload_gradients
    assert t.gradient_bytes(tensors, offloaded) == (6144 + 1_000_000) * 4 == 4_024_576  # small + one in flight
    kept = setup_for(
        {"method": "lora", "memory": {"optimizer": "cpu_offload"}, "training": {"gradient_accumulation_steps": 2}}
    )
    assert t.gradient_bytes(tensors, kept) == (6144 + 2_000_000) * 4 == 8_024_576


def test_galore_states_sit_on_rank_r_projections_of_the_decoder_weights():
    s = setup_for({"method": "full", "memory": {"optimizer": "galore_adamw"}, "galore": {"rank": 128}})
    tensors = t.trainable_tensors(Q05, s)
    plain = t.trainable_numel(tensors) * 2 * 4  # fp32 params (bf16-mixed): two fp32 states each
    # Per layer, [out, in] -> two fp32 states of 128 x max(out, in) + a 128 x min(out, in) fp32 projection:
    # q, o 896x896: 2 x (2*128*896 + 128*896) ; k, v 128x896 (r = 128): 2 x (2*128*896 + 128*128);
    # gate, up 4864x896 and down 896x4864: 3 x (2*128*4864 + 128*896)
    projected = 4 * (2 * (3 * 128 * 896) + 2 * (2 * 128 * 896 + 128 * 128) + 3 * (2 * 128 * 4864 + 128 * 896))
    unprojected = 8 * (2 * 896 * 896 + 2 * 128 * 896 + 3 * 896 * 4864)
    assert t.galore_state_bytes(Q05, tensors, s) == plain + 24 * (projected - unprojected)
    # the SVD refresh of the largest gradient (4864 x 896, fp32: no copy): U 4864x896, S, Vh 896x896
    assert t.galore_temp_bytes(Q05, s) == (4864 * 896 + 896 + 896 * 896) * 4 == 20_647_424
    bf16 = setup_for({"method": "full", "memory": {"optimizer": "galore_adamw", "precision": "bf16"}})
    assert t.galore_temp_bytes(Q05, bf16) == 20_647_424 + 4864 * 896 * 4  # + the bf16 grad's fp32 copy
    with pytest.raises(ValueError, match="galore_state_bytes"):
        t.optimizer_state_bytes(tensors, s)


@pytest.mark.parametrize(
    "proj_type, expected",
    [
        # [out, in] = [4864, 896] at rank 128: (projected gradient, projection matrices) elements
        ("std", (128 * 4864, 128 * 896)),  # the smaller side: Vh[:128] (128 x 896), grad @ Vh.T -> 4864 x 128
        ("reverse_std", (128 * 896, 128 * 4864)),  # the larger: U[:, :128] (4864 x 128), U.T @ grad -> 128 x 896
        ("right", (4864 * 128, 128 * 896)),
        ("left", (128 * 896, 4864 * 128)),
        ("full", (128 * 128, 128 * (4864 + 896))),
    ],
)
def test_galore_projection_shapes(proj_type, expected):
    s = setup_for({"method": "full", "memory": {"optimizer": "galore_adamw"}, "galore": {"proj_type": proj_type}})
    assert t.galore_projection_numels(4864, 896, s) == expected
    assert (
        t.galore_projection_numels(
            4864,
            64,
            setup_for(  # rank capped by the SVD's 64 singular vectors
                {"method": "full", "memory": {"optimizer": "galore_adamw"}}
            ),
        )[1]
        == 64 * 64
    )


def test_galore_shrinks_a_full_plan_and_suggestions_leave_valid_specs():
    shape = find_model("Qwen/Qwen2.5-7B")
    peak = {
        opt: sum(
            estimate(
                JobSpec(
                    base_model=shape.name,
                    method="full",
                    galore={"rank": 128} if "galore" in opt else None,
                    memory={"optimizer": opt, "precision": "bf16"},
                ),
                shape,
                1,
            )[1].values()
        )
        for opt in ("adamw", "adamw_8bit", "galore_adamw", "galore_adamw_8bit")
    }
    assert peak["galore_adamw_8bit"] < peak["galore_adamw"] < peak["adamw_8bit"] < peak["adamw"]
    from planner.suggest import _candidates

    galore = JobSpec(
        base_model=shape.name,
        method="full",
        galore={"rank": 512},
        memory={"optimizer": "galore_adamw", "precision": "bf16"},
        training={"micro_batch_size": 8},
    )
    patches = {description.split(" (")[0]: patch for _, description, patch in _candidates(galore, shape, 8)}
    assert patches["optimizer galore_adamw→paged_adamw_8bit"]["galore"] is None
    assert patches["method full→lora"] == {
        "method": "lora",
        "freeze": None,
        "memory": {"optimizer": "adamw"},
        "galore": None,
    }
    for patch in patches.values():  # each one validates on its own (apply_patch raises otherwise)
        apply_patch(galore, patch)
    plain = JobSpec(base_model=shape.name, method="full", training={"micro_batch_size": 8, "max_seq_length": 4096})
    assert any("→galore_adamw" in description for _, description, _ in _candidates(plain, shape, 8))
    # not combined: with it, method→lora could not follow (lora + galore is invalid) and nothing was offered
    assert [s.description for s in plan(plain, shape, 24 * 2**30).suggestions] == [
        "micro_batch_size 8→1 with gradient_accumulation_steps ×8 (same effective batch); method full→lora"
    ]


def test_new_optimizers_shrink_the_plan():
    peak = {
        opt: sum(
            estimate(
                JobSpec(base_model="Qwen/Qwen2.5-7B", method="full", memory={"optimizer": opt, "precision": "bf16"}),
                find_model("Qwen/Qwen2.5-7B"),
                1,
            )[1].values()
        )
        for opt in ("adamw", "adamw_8bit", "adamw_4bit", "cpu_offload")
    }
    assert peak["cpu_offload"] < peak["adamw_4bit"] < peak["adamw_8bit"] < peak["adamw"]


# ---- qlora data types --------------------------------------------------------------------------------------
def test_int8_weights_and_row_scales():
    s = setup_for({"method": "qlora", "quantization": {"bits": 8}})
    # per layer 896*896*2 + 896*128*2 + 896*4864*3 = 14,909,440 int8 weights; x 24 layers
    assert t.layer_linear_weight_bytes(Q05, s) == 14_909_440 * 24 == 357_826_560
    # one fp32 scale per output row: 896 + 128 + 128 + 896 + 4864 + 4864 + 896 = 12,672 rows x 4 B x 24
    assert t.quant_constant_bytes(Q05, s) == 12_672 * 4 * 24 == 1_216_512
    assert t.dequant_buffer_bytes(Q05, s) == 896 * 4864 * 2  # fp16 dequantized weight in backward


def test_fp4_is_stored_like_nf4():
    nf4, fp4 = setup_for({"method": "qlora"}), setup_for({"method": "qlora", "quantization": {"quant_type": "fp4"}})
    assert t.layer_linear_weight_bytes(Q05, fp4) == t.layer_linear_weight_bytes(Q05, nf4) == 14_909_440 * 24 // 2
    assert t.quant_constant_bytes(Q05, fp4) == t.quant_constant_bytes(Q05, nf4)


# ---- packing, fused loss ---------------------------------------------------------------------------------
def test_packing_mask_exists_at_any_micro_batch():
    assert t.attention_mask_bytes(setup_for({"method": "lora"}, mb=1)) == 0  # one unpadded row: is_causal
    packed = setup_for({"method": "lora", "training": {"packing": True}}, mb=1)
    assert t.attention_mask_bytes(packed) == 1024 * 1024  # block-diagonal bool [1, 1, 1024, 1024]
    assert t.attention_bias_bytes(packed) == 1024 * 1024 * 2  # sdpa's bf16 additive copy, saved per layer


@pytest.mark.parametrize("packing", [False, True])
def test_padding_free_batches_carry_no_mask_and_native_gqa(packing):
    training = {"packing": packing}
    masked = setup_for({"method": "lora", "training": training})
    free = setup_for({"method": "lora", "training": training | {"padding_free": True}})
    assert t.attention_mask_bytes(masked) == 4 * 1024 * 1024 and t.attention_mask_bytes(free) == 0
    assert t.attention_bias_bytes(free) == 0
    saved = t.layer_activation_bytes(Q05, masked, False) - t.layer_activation_bytes(Q05, free, False)
    # no k/v repeated to 14 heads (2 B x 2 x (896 - 128) per token) and no bf16 bias [4, 1, 1024, 1024] per layer
    assert saved == 4096 * 2 * 2 * 768 + 4 * 1024 * 1024 * 2
    spec = {"base_model": Q05.name, "method": "lora", "memory": {"gradient_checkpointing": False}}
    masked_plan, free_plan = (
        plan(JobSpec.model_validate(spec | {"training": training | {"padding_free": on}}), Q05) for on in (False, True)
    )
    assert masked_plan.breakdown["attention_mask"] == 4 * 1024 * 1024 and not free_plan.breakdown.get("attention_mask")
    # every one of the 24 layers saves it (the peak may fall in another phase, so at least that much)
    assert masked_plan.peak_vram_bytes - free_plan.peak_vram_bytes >= 24 * saved


# ---- Liger kernels (liger-kernel 0.8.5's saved tensors, read from its source) ---------------------------------
def test_liger_layer_saves_input_and_rstd_per_norm_and_two_mlp_operands():
    plain = setup_for({"method": "lora"})
    liger = setup_for({"method": "lora", "memory": {"liger_kernels": True}})
    assert liger.liger and not plain.liger and (liger.residual_bytes, liger.mlp_bytes) == (2, 2)
    per_token = t.base_activation_bytes_per_token(Q05, plain, False) - t.base_activation_bytes_per_token(
        Q05, liger, False
    )
    # norms: 2 x 896 x 4 (fp32 upcast) -> 2 x (896 x 2 + 4); MLP: 3 -> 2 tensors of 4864 x 2 B
    assert per_token == (2 * 896 * 4 - 2 * (896 * 2 + 4)) + 4864 * 2 == 3576 + 9728


def test_liger_loss_holds_input_its_gradient_and_one_compute_dtype_chunk():
    liger = setup_for({"method": "lora", "memory": {"liger_kernels": True}})
    assert liger.fused_loss  # Liger's loss is the fused path, whatever memory.fused_loss says
    # inc_factor ceil(151936 / 896) = 170; ceil(4096 / 170) = 25 -> next power of two 32 positions
    assert t.liger_chunk_tokens(Q05, liger) == 32
    assert t.loss_block_bytes(Q05, liger) == 32 * 151936 * 2
    assert t.loss_forward_bytes(Q05, liger) == 2 * 4096 * 896 * 2 + 4096 * 4 + 32 * 151936 * 2 == 24_420_352
    full = setup_for({"method": "full", "memory": {"liger_kernels": True}})
    # a trained (tied) lm_head: grad_weight [151936, 896] in the fp32 master dtype, allocated in forward
    assert t.loss_forward_bytes(Q05, full) - t.loss_forward_bytes(Q05, liger) == 151936 * 896 * 4


def test_liger_is_planned_only_where_the_worker_applies_it():
    asked = {"liger_kernels": True}
    assert not setup_for({"method": "lora"}).liger  # off by default until measured (policy)
    sharded = {"method": "lora", "memory": asked, "resources": {"num_gpus": 2, "sharding": "zero3"}}
    assert not setup_for(sharded).liger
    mixtral = find_model("mistralai/Mixtral-8x7B-v0.1")
    spec = JobSpec.model_validate({"base_model": mixtral.name, "method": "lora", "memory": asked})
    assert not build_setup(spec, mixtral, 1, WORKER).liger  # MoE layers keep transformers' modules


def test_padding_free_is_suggested_where_a_mask_would_be_built():
    from planner.suggest import _candidates

    def offered(body: dict, shape=Q05, mb: int = 4) -> bool:
        spec = JobSpec.model_validate({"base_model": shape.name, "method": "lora", **body})
        return any(d.startswith("padding_free on") for _, d, _ in _candidates(spec, shape, mb))

    assert offered({}) and offered({"training": {"packing": True}}, mb=1)
    assert not offered({}, mb=1)  # one unpadded row: no mask to drop
    assert not offered({"training": {"padding_free": True}})
    gemma = find_model("google/gemma-2-2b")
    assert not offered({}, shape=gemma)  # soft-capped attention: refused with padding_free
    spec = {"base_model": Q05.name, "method": "lora", "training": {"micro_batch_size": 8, "max_seq_length": 4096}}
    masked = plan(JobSpec.model_validate(spec), Q05)
    free = plan(JobSpec.model_validate(spec | {"training": spec["training"] | {"padding_free": True}}), Q05)
    gpu = (masked.peak_vram_bytes + free.peak_vram_bytes) // 2 + 2**30  # the 1 GiB margin floor on top
    advice = plan(JobSpec.model_validate(spec), Q05, gpu)
    assert advice.fits is False
    assert advice.suggestions[0].description.startswith("padding_free on")
    assert advice.suggestions[0].peak_vram_bytes == free.peak_vram_bytes


# ---- activation offload --------------------------------------------------------------------------------------
@pytest.mark.parametrize("checkpointing", [True, False])
def test_offloaded_activations_keep_one_layer_on_the_gpu_and_the_rest_on_the_host(checkpointing):
    memory = {"gradient_checkpointing": checkpointing}
    plain = setup_for({"method": "lora", "memory": memory})
    offloaded = setup_for({"method": "lora", "memory": memory | {"offload_activations": True}})
    per_layer = t.saved_layer_bytes(Q05, plain)
    if checkpointing:
        assert per_layer == 4096 * 896 * 2  # one layer's bf16 input at 4 x 1024 tokens
    assert t.saved_activation_bytes(Q05, plain) == 24 * per_layer
    assert t.saved_activation_bytes(Q05, offloaded) == per_layer
    assert t.offloaded_activation_bytes(Q05, offloaded) == 24 * per_layer
    body = {"base_model": Q05.name, "method": "lora", "memory": memory}
    on_gpu = plan(JobSpec.model_validate(body), Q05)
    on_host = plan(JobSpec.model_validate(body | {"memory": memory | {"offload_activations": True}}), Q05)
    assert on_host.host_breakdown == {"offloaded_activations": 24 * per_layer}
    assert on_gpu.host_breakdown == {} and on_host.peak_vram_bytes < on_gpu.peak_vram_bytes
    every = on_host.phases["forward_loss"]
    assert every["activations"] + every.get("lora_dropout_copies", 0) <= 2 * per_layer


def test_fused_loss_default_is_on_for_the_worker_only():
    assert setup_for({"method": "lora"}).fused_loss is True
    assert setup_for({"method": "lora"}, recipe=HF_TRAINER).fused_loss is False  # the stock recipe has none
    assert setup_for({"method": "lora", "memory": {"fused_loss": False}}).fused_loss is False
    assert setup_for({"method": "lora", "memory": {"fused_loss": True}}, recipe=HF_TRAINER).fused_loss is True


# ---- freeze.trainable_modules -----------------------------------------------------------------------------
def test_freeze_modules_mlp():
    tensors, first, layers = freeze_module_tensors(Q05, ["mlp"])
    assert tensors == ((896 * 4864, 72),) and first == 0 and layers == 24  # gate/up/down x 24


def test_freeze_modules_one_attention_block():
    tensors, first, layers = freeze_module_tensors(Q05, ["layers.23.self_attn"])
    # q, o 896x896; k, v 896x128; biases q 896, k 128, v 128
    assert dict(tensors) == {802_816: 2, 114_688: 2, 896: 1, 128: 2} and (first, layers) == (23, 1)
    s = setup_for({"method": "freeze", "freeze": {"trainable_modules": ["layers.23.self_attn"]}})
    assert t.grad_layers(Q05, s) == 1
    assert s.trained_numel == 2 * 802_816 + 2 * 114_688 + 896 + 256 == 1_836_160
    # bf16-mixed: the trained tensors are fp32 (2 extra bytes each on top of their bf16 size)
    assert (
        t.unquantized_weight_bytes(Q05, s)
        - t.unquantized_weight_bytes(
            Q05, setup_for({"method": "freeze", "freeze": {"trainable_modules": ["model.norm"]}})
        )
        == (1_836_160 - 896) * 2
    )


def test_freeze_modules_tied_lm_head_is_the_embedding():
    tensors, first, _ = freeze_module_tensors(Q05, ["lm_head"])
    assert tensors == ((151_936 * 896, 1),) and first == 0  # one shared tensor; autograd from layer 0


# ---- spec rules ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, message",
    [
        ({"method": "qlora", "lora": {"init": "pissa"}}, "unquantized base"),
        ({"method": "qlora", "quantization": {"bits": 8, "quant_type": "fp4"}}, "bits=4 only"),
        ({"method": "freeze", "freeze": {"trainable_layers": 1, "trainable_modules": ["mlp"]}}, "not both"),
        ({"method": "freeze", "freeze": {"trainable_modules": []}}, "at least 1"),
        ({"method": "full", "output": {"merge_adapter": True}}, "merge_adapter"),
        ({"method": "lora", "memory": {"optimizer": "cpu_offload", "precision": "fp16-mixed"}}, "bf16-mixed"),
        ({"method": "lora", "lora": {"loraplus_lr_ratio": 0}}, "greater than 0"),
        ({"method": "lora", "training": {"validation_fraction": 0.9}}, "less than or equal"),
    ],
)
def test_spec_rules(body, message):
    with pytest.raises(ValidationError, match=message):
        JobSpec.model_validate({"base_model": "m", **body})


def test_v1_names_and_defaults_unchanged():
    spec = JobSpec(base_model="m")
    assert spec.memory.fused_loss is None and spec.training.packing is False
    assert spec.quantization_options.bits == 4 and spec.quantization_options.quant_type == "nf4"
    assert spec.lora_options.init == "default" and spec.output.merge_adapter is False
    assert JobSpec(base_model="m", memory={"fused_loss": False}).memory.fused_loss is False
