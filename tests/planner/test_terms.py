"""Each memory term against a hand-computed value (arithmetic in the comments)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from domain.spec import JobSpec
from planner import terms as t
from planner.catalog import find_model
from planner.core import HF_TRAINER, WORKER, build_setup
from planner.shapes import ModelShape

Q05 = find_model("Qwen/Qwen2.5-0.5B")
UNPADDED = replace(WORKER, padded_batches=False)  # every sequence at full length: no attention mask
L1B = find_model("meta-llama/Llama-3.2-1B")


def setup_for(body: dict, shape: ModelShape = Q05, mb: int = 4, recipe=WORKER) -> t.Setup:
    spec = JobSpec.model_validate({"base_model": shape.name, **body})
    return build_setup(spec, shape, mb, recipe)


@pytest.mark.parametrize(
    "numel, expected",
    [
        (4096 * 4096, 8_388_608),  # two codes per byte
        (896 * 4864, 2_179_072),
        (7, 4),  # odd count rounds up
    ],
)
def test_nf4_packed(numel, expected):
    assert t.nf4_packed_bytes(numel) == expected


@pytest.mark.parametrize(
    "numel, double, expected",
    [
        # 16,777,216 / 64 = 262,144 blocks: uint8 absmax 262,144 + 1,024 fp32 second-level (4,096) + 1,024 code
        (4096 * 4096, True, 267_264),
        (4096 * 4096, False, 1_048_576),  # 262,144 fp32 absmax
        # 896*896 = 802,816 -> 12,544 blocks; ceil(12,544/256) = 49 -> 196 bytes; + 1,024
        (896 * 896, True, 13_764),
    ],
)
def test_nf4_constants(numel, double, expected):
    assert t.nf4_constants_bytes(numel, double) == expected


@pytest.mark.parametrize(
    "optimizer, tensors, device, paged",
    [
        ("adamw", [(1_000_000, 1)], 8_000_000, 0),  # fp32 adapters: 2 states x 4 B
        # 8-bit: 2 x 1 B + 2 x ceil(1e6/256)=3,907 fp32 absmax
        ("adamw_8bit", [(1_000_000, 1)], 2_031_256, 0),
        ("adamw_8bit", [(2048, 3)], 3 * 2048 * 8, 0),  # below min_8bit_size 4096: fp32 states
        ("paged_adamw_8bit", [(1_000_000, 1), (50_000, 2)], 2 * (100_000 + 2 * 196 * 4), 2_031_256),
        ("paged_adamw_32bit", [(1_000_000, 1), (14_336, 1)], 14_336 * 8, 8_000_000),
    ],
)
def test_optimizer_states(optimizer, tensors, device, paged):
    s = setup_for({"method": "lora", "memory": {"optimizer": optimizer}})
    assert t.optimizer_state_bytes(tensors, s) == (device, paged)


def test_bf16_full_adamw_states_are_bf16():
    s = setup_for({"method": "full", "memory": {"precision": "bf16"}})
    assert t.optimizer_state_bytes([(1000, 1)], s) == (4000, 0)  # 2 states x 2 B


def test_trainable_counts_match_calibration():
    # peft's trainable count in calibration rows q05-lora-gc (8,798,208) and q7b-qlora-gc-2k (40,370,176)
    s = setup_for({"method": "lora"})
    assert t.trainable_numel(t.trainable_tensors(Q05, s)) == 8_798_208
    q7b = find_model("Qwen/Qwen2.5-7B")
    assert t.trainable_numel(t.trainable_tensors(q7b, setup_for({"method": "qlora"}, q7b))) == 40_370_176
    l2 = find_model("meta-llama/Llama-2-7b-hf")
    s = setup_for({"method": "qlora", "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}, l2)
    assert t.trainable_numel(t.trainable_tensors(l2, s)) == 4_194_304  # l2-7b-seed003


def test_full_and_freeze_trainable():
    full = setup_for({"method": "full"})
    assert t.trainable_numel(t.trainable_tensors(Q05, full)) == Q05.num_params == 494_032_768
    freeze = setup_for({"method": "freeze", "freeze": {"trainable_layers": 2}})
    assert t.trainable_numel(t.trainable_tensors(Q05, freeze)) == 2 * 14_912_384  # one qwen2.5-0.5b layer


def test_qlora_weights_reproduce_after_load():
    # calibration q05-qlora-gc after_load_alloc = 765,773,312 (upcast recipe: fp32 embeddings/norms/biases)
    s = setup_for({"method": "qlora"}, recipe=HF_TRAINER)
    weights = (
        t.layer_linear_weight_bytes(Q05, s)
        + t.unquantized_weight_bytes(Q05, s)
        + t.quant_constant_bytes(Q05, s)
        + t.adapter_weight_bytes(t.trainable_tensors(Q05, s), s)
    )
    # 178,913,280 packed + 544,824,832 fp32 unquantized + 5,591,040 uint8 absmax + 168 x (49..) + 35,192,832
    assert weights == pytest.approx(765_773_312, rel=0.002)


def test_qlora_lean_path_keeps_bf16_heads():
    upcast = setup_for({"method": "qlora"}, recipe=HF_TRAINER)
    lean = setup_for({"method": "qlora"})
    # 136,206,208 unquantized params: 4 B when upcast, 2 B in the worker
    assert t.unquantized_weight_bytes(Q05, upcast) == 544_824_832
    assert t.unquantized_weight_bytes(Q05, lean) == 272_412_416
    assert t.lm_head_cast_bytes(Q05, upcast) == 151936 * 896 * 2
    assert t.lm_head_cast_bytes(Q05, lean) == 0


@pytest.mark.parametrize(
    "body, mb, expected_per_token",
    [
        # lora all-linear r16, dropout: norms 2*4*896=7,168; sdpa 2*(2*896+2*128)=4,096; mlp 3*4864*2=29,184;
        # adapters 3*(5*896 + 896 + 4864)=30,720 + 7*2*16=224  -> 71,392
        ({"method": "lora"}, 4, 71_392),
        # dropout 0: 2 B per adapted input instead of 3 -> 71,392 - 10,240
        ({"method": "lora", "lora": {"dropout": 0}}, 4, 61_152),
        # DoRA adds per adapted linear 2*2*out (base/lora results) + 2*in (the re-done base matmul's input):
        # outs 896+128+128+896+4864+4864+896 = 12,672 -> 50,688; ins 10,240 -> 20,480; 71,392 + 71,168
        ({"method": "lora", "lora": {"use_dora": True}}, 4, 142_560),
        # full bf16: norms 2*(4+2)*896=10,752; sdpa 4,096; mlp 29,184; inputs 2*(896+896+896+4864)=15,104
        ({"method": "full", "memory": {"precision": "bf16"}}, 4, 59_136),
    ],
)
def test_layer_activations(body, mb, expected_per_token):
    s = setup_for(body, mb=mb, recipe=UNPADDED)
    assert t.layer_activation_bytes(Q05, s, trainable=s.method == "full") == expected_per_token * 4 * 1024


def test_checkpoint_and_logits():
    s = setup_for({"method": "lora", "memory": {"fused_loss": False}})  # 4 x 1024 = 4,096 tokens
    assert t.checkpoint_bytes(Q05, s) == 4096 * 896 * 2 == 7_340_032
    assert t.logits_fp32_bytes(Q05, s) == 4096 * 151936 * 4 == 2_489_319_424
    assert t.loss_backward_bytes(Q05, s) == 3 * 2_489_319_424
    assert t.loss_forward_bytes(Q05, s) == 4096 * 151936 * 2 + 2 * 2_489_319_424


def test_fused_loss_is_chunked():
    s = setup_for({"method": "lora", "memory": {"fused_loss": True}})
    # 1024-position chunks: 3 fp32 chunk x vocab buffers, + the gathered 4096 x 896 bf16 hidden states
    assert t.fused_loss_bytes(Q05, s) == 1024 * 151936 * 12 + 4096 * 896 * 2 == 1_874_329_600
    assert t.loss_backward_bytes(Q05, s) < 0.3 * 3 * t.logits_fp32_bytes(Q05, s)  # unfused: 3 x 4096 rows


def test_gemma2_softcap_adds_a_logits_copy():
    g = find_model("google/gemma-2-2b")
    s = setup_for({"method": "lora", "memory": {"fused_loss": False}}, g, mb=1)
    assert t.loss_backward_bytes(g, s) == 3 * 1024 * 256000 * 4 + 1024 * 256000 * 2


def test_dequant_buffer_is_one_weight():
    s = setup_for({"method": "qlora"})
    assert t.dequant_buffer_bytes(Q05, s) == 896 * 4864 * 2
    assert t.dequant_buffer_bytes(Q05, setup_for({"method": "lora"})) == 0


def test_autocast_cache_only_for_fp32_params():
    s = setup_for({"method": "full", "memory": {"precision": "bf16-mixed"}})
    assert t.autocast_cache_bytes(Q05, s) == 2 * (24 * Q05.layer_linear_numel + Q05.embed_numel)
    assert t.autocast_cache_bytes(Q05, setup_for({"method": "full", "memory": {"precision": "bf16"}})) == 0
    assert t.autocast_cache_bytes(Q05, setup_for({"method": "full", "memory": {"precision": "fp32"}})) == 0


def test_dora_weight_copies():
    s = setup_for({"method": "qlora", "lora": {"use_dora": True}})
    assert t.dora_weight_copy_bytes(Q05, s) == 2 * 14_909_440  # bf16 copy of the 7 projections of a layer
    assert t.dora_weight_copy_bytes(Q05, setup_for({"method": "qlora", "lora": {"use_dora": True, "dropout": 0}})) == 0
    assert t.dora_norm_temp_bytes(Q05, s) == 8 * 896 * 4864


def test_padding_mask_and_repeated_kv():
    padded, plain = setup_for({"method": "lora"}), setup_for({"method": "lora"}, recipe=UNPADDED)
    assert t.attention_mask_bytes(padded) == 4 * 1024 * 1024  # bool [4, 1, 1024, 1024]
    assert t.attention_bias_bytes(padded) == 4 * 1024 * 1024 * 2  # its bf16 additive copy, per layer
    extra = t.layer_activation_bytes(Q05, padded, False) - t.layer_activation_bytes(Q05, plain, False)
    # k and v repeated from 2 to 14 heads: 2 B x 2 x (896 - 128) per token, + the per-layer bias
    assert extra == 4096 * 2 * 2 * 768 + 8_388_608
    one = setup_for({"method": "lora"}, mb=1)  # a single sequence is never padded
    assert t.attention_mask_bytes(one) == 0


@pytest.mark.parametrize(
    "precision, autocast, frozen, per_in",
    [
        ("bf16-mixed", True, 2, 3),  # mask + bf16 autocast copy
        ("fp16-mixed", True, 2, 3),
        ("bf16", False, 2, 5),  # mask + fp32 input of the fp32 adapter (peft _cast_input_dtype)
        ("fp32", False, 4, 5),
    ],
)
def test_worker_precision_plan_for_adapters(precision, autocast, frozen, per_in):
    s = setup_for({"method": "lora", "memory": {"precision": precision}})
    assert (s.autocast, s.frozen_bytes, s.head_bytes) == (autocast, frozen, frozen)
    a_in = 2 if autocast else 4
    assert t.adapter_activation_bytes_per_token(s) == per_in * 10_240 + 7 * a_in * 16


def test_freeze_trains_last_layers_in_fp32_under_mixed():
    s = setup_for({"method": "freeze", "freeze": {"trainable_layers": 2}})
    assert (s.trained_bytes, s.frozen_bytes, s.autocast_fp32_params) == (4, 2, True)
    # 22 frozen bf16 layers + 2 fp32 layers of 14,909,440 projection weights
    assert t.layer_linear_weight_bytes(Q05, s) == 14_909_440 * (22 * 2 + 2 * 4)
    assert t.autocast_cache_bytes(Q05, s) == 2 * 2 * 14_909_440
    assert t.optimizer_state_bytes(t.trainable_tensors(Q05, s), s)[0] == 2 * 14_912_384 * 8
