"""Every config.json is planned correctly or refused with a code: MoE, multimodal, pre-quantized, unknown
families, bad LoRA targets, too long a sequence. Parameter counts are hand-computed from the configs."""

from __future__ import annotations

import pytest

from domain.spec import JobSpec
from planner import ModelShape, plan
from planner.catalog import find_model, model_ids
from planner.scope import PlanRefused
from planner.shapes import UnsupportedArchitecture, UnsupportedQuantization

GIB = 2**30
LLAMA = {
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}
MIXTRAL = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 32768,
}
QWEN_MOE = {
    "model_type": "qwen2_moe",
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 151936,
    "max_position_embeddings": 8192,
}
QWEN1_7B = {
    "model_type": "qwen",
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "seq_length": 8192,
}


def spec(**body) -> JobSpec:
    return JobSpec.model_validate({"base_model": "x", **body})


# ---- parameter counts, by hand ------------------------------------------------------------------------------
PARAMS = [
    # Mixtral-8x7B: per layer attention 2 x 4096^2 + 2 x 4096 x 1024 = 41,943,040; experts 8 x 3 x 4096 x 14336 =
    # 1,409,286,144; router 8 x 4096 = 32,768; norms 8,192 -> 1,451,270,144 x 32 = 46,440,644,608;
    # + embed and lm_head 2 x 32000 x 4096 = 262,144,000 + final norm 4,096 = 46,702,792,704 (published: 46.7B)
    (MIXTRAL, 46_702_792_704),
    # Qwen1.5-MoE-A2.7B: attention 4 x 2048^2 = 16,777,216 + q/k/v biases 6,144; experts 60 x 3 x 2048 x 1408 =
    # 519,045,120; shared expert 3 x 2048 x 5632 = 34,603,008 + its gate 2,048; router 60 x 2048 = 122,880;
    # norms 4,096 -> 570,560,512 x 24 = 13,693,452,288; + 2 x 151936 x 2048 = 622,329,856 + 2,048
    # = 14,315,784,192 (published: 14.3B)
    (QWEN_MOE, 14_315_784_192),
    # Qwen-7B (first generation): c_attn 4096 x 12288 = 50,331,648 + bias 12,288; attn.c_proj 4096^2 = 16,777,216;
    # w1, w2, mlp.c_proj 3 x 4096 x 11008 (22016 // 2) = 135,266,304; norms 8,192 -> 202,395,648 x 32 =
    # 6,476,660,736; + 2 x 151936 x 4096 = 1,244,659,712 + 4,096 = 7,721,324,544 (published: 7.72B, not 12.05B)
    (QWEN1_7B, 7_721_324_544),
]


@pytest.mark.parametrize("config, params", PARAMS)
def test_parameter_counts(config, params):
    assert ModelShape.from_config(config).num_params == params


def test_catalog_models_have_their_published_sizes():
    published = {
        "meta-llama/Llama-3.1-70B": 70.55e9,
        "meta-llama/Llama-3.3-70B-Instruct": 70.55e9,
        "meta-llama/Llama-3.1-405B": 405.85e9,
        "mistralai/Mistral-7B-v0.1": 7.24e9,
        "mistralai/Mixtral-8x7B-v0.1": 46.70e9,
        "microsoft/Phi-3-mini-4k-instruct": 3.82e9,
        "microsoft/Phi-3-medium-4k-instruct": 13.96e9,
        "Qwen/Qwen1.5-MoE-A2.7B": 14.32e9,
    }
    for hub_id, params in published.items():
        assert abs(find_model(hub_id).num_params - params) / params < 0.002, hub_id
    assert find_model("meta-llama/Meta-Llama-3.1-70B-Instruct") is find_model("meta-llama/Llama-3.1-70B")


# ---- MoE: all experts' weights and states, top-k experts' activations --------------------------------------
def test_mixtral_lora_keeps_every_expert_in_bf16():
    shape = ModelShape.from_config(MIXTRAL)
    lora = plan(spec(method="lora"), shape, 24 * GIB)
    assert lora.fits is False and lora.breakdown["weights"] >= 2 * shape.num_params  # bf16, all 46.7B
    # qlora quantizes nn.Linear only: the 3-D expert tensors stay bf16 (2 B x 32 x 1,409,286,144 = 90.2e9 B)
    qlora = plan(spec(method="qlora"), shape, None)
    assert qlora.breakdown["weights"] > 2 * 32 * 1_409_286_144
    # all-linear adapts the attention only (experts are not nn.Linear): r=16 x (4096+4096, 4096+1024 x 2, 4096+4096)
    assert qlora.breakdown["trainable_params"] == 4 * 32 * 16 * (8192 + 5120 + 5120 + 8192)


def test_moe_full_fine_tune_keeps_states_for_every_expert():
    shape = ModelShape.from_config(MIXTRAL)
    p = plan(spec(method="full", memory={"precision": "bf16"}), shape, None)
    assert p.breakdown["optimizer_states"] == 4 * shape.num_params  # adamw, 2 bf16 states of every parameter


def test_moe_activations_follow_the_top_k():
    top2 = ModelShape.from_config(MIXTRAL)
    top4 = ModelShape.from_config(MIXTRAL | {"num_experts_per_tok": 4})
    s = spec(method="lora", memory={"gradient_checkpointing": False})
    a2, a4 = (plan(s, shape, None).breakdown for shape in (top2, top4))
    assert a2["weights"] == a4["weights"] and a4["activations"] > a2["activations"]
    # each more expert per token adds its gated-MLP tensors (3 x 14336 bf16) and its weighted output (4096 bf16):
    # the peak is early in backward: the 32 layers' saved tensors + one layer's backward temporaries (33 layers)
    per_token = 2 * (3 * 14336 * 2 + 4096 * 2)
    assert a4["activations"] - a2["activations"] == 33 * 4 * 1024 * per_token


# ---- refused ---------------------------------------------------------------------------------------------
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
        UnsupportedArchitecture,
        "not a family",
    ),
    (LLAMA | {"model_type": "qwen2_vl", "vision_config": {"depth": 32}}, UnsupportedArchitecture, "multimodal"),
    (
        {
            "model_type": "llava",
            "text_config": {"model_type": "llama"},
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "vocab_size": 32064,
        },
        UnsupportedArchitecture,
        "multimodal",
    ),
    (
        LLAMA | {"model_type": "deepseek_v2", "kv_lora_rank": 512, "n_routed_experts": 64},
        UnsupportedArchitecture,
        "MLA",
    ),
    (LLAMA | {"model_type": "deepseek_v3", "n_routed_experts": 256}, UnsupportedArchitecture, "MLA"),
    (QWEN_MOE | {"mlp_only_layers": [0]}, UnsupportedArchitecture, "dense layers"),
    (LLAMA | {"quantization_config": {"quant_method": "gptq", "bits": 4}}, UnsupportedQuantization, "gptq"),
    (LLAMA | {"quantization_config": {"quant_method": "awq", "bits": 4}}, UnsupportedQuantization, "awq"),
    (
        LLAMA | {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
        UnsupportedQuantization,
        "bitsandbytes",
    ),
]


@pytest.mark.parametrize("config, error, needle", REFUSED)
def test_configs_the_planner_does_not_model_are_refused(config, error, needle):
    with pytest.raises(error, match=needle) as raised:
        ModelShape.from_config(config)
    assert raised.value.code in ("unsupported_architecture", "unsupported_quantization")


# ---- LoRA targets and sequence length ------------------------------------------------------------------------
TARGETS = [
    (LLAMA, ["q_proj", "v_proj"], None),
    (LLAMA, ["self_attn.q_proj", "model.layers.3.mlp.down_proj"], None),
    (LLAMA, ["c_attn"], "invalid_lora_targets"),
    (LLAMA, ["q_prj"], "invalid_lora_targets"),
    (LLAMA, ["layers.4.q_proj"], "invalid_lora_targets"),  # 4 layers: 0-3
    (LLAMA, ["mlp"], "invalid_lora_targets"),  # a module, not an nn.Linear: peft refuses it
    (QWEN1_7B, ["c_attn", "w1"], None),
    (QWEN1_7B, ["q_proj"], "invalid_lora_targets"),
    (MIXTRAL, ["experts"], "invalid_lora_targets"),
    (QWEN_MOE, ["mlp.shared_expert.gate_proj"], None),
]


@pytest.mark.parametrize("config, targets, code", TARGETS)
def test_lora_targets_checked_against_the_architecture(config, targets, code):
    s = spec(method="lora", lora={"target_modules": targets})
    if code is None:
        assert plan(s, ModelShape.from_config(config), None).peak_vram_bytes > 0
        return
    with pytest.raises(PlanRefused) as refused:
        plan(s, ModelShape.from_config(config), None)
    assert refused.value.code == code


CONTEXT = [
    (LLAMA, 4096, None),
    (LLAMA, 8192, "sequence_too_long"),
    (LLAMA | {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 8192, None),  # 4096 x 2
    (
        LLAMA
        | {
            "max_position_embeddings": 32768,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        },
        131072,
        None,
    ),
    (
        LLAMA
        | {
            "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
        },
        262144,
        "sequence_too_long",
    ),  # llama3 scaling: max_position_embeddings is already the extended length
]


@pytest.mark.parametrize("config, seq, code", CONTEXT)
def test_max_seq_length_checked_against_the_context(config, seq, code):
    s = spec(method="qlora", training={"max_seq_length": seq, "micro_batch_size": 1})
    shape = ModelShape.from_config(config)
    if code is None:
        assert plan(s, shape, None).peak_vram_bytes > 0
        return
    with pytest.raises(PlanRefused) as refused:
        plan(s, shape, None)
    assert refused.value.code == code


def test_every_problem_reported_at_once():
    s = spec(method="lora", lora={"target_modules": ["c_attn"]}, training={"max_seq_length": 8192})
    with pytest.raises(PlanRefused) as refused:
        plan(s, ModelShape.from_config(LLAMA), None)
    assert [p.code for p in refused.value.problems] == ["invalid_lora_targets", "sequence_too_long"]


def test_catalog_without_context_is_not_refused():
    assert find_model("Qwen/Qwen2.5-7B").context_length is None  # older entries: no max_position_embeddings
    assert (
        plan(
            spec(method="qlora", training={"max_seq_length": 65536, "micro_batch_size": 1}),
            find_model("Qwen/Qwen2.5-7B"),
            None,
        ).peak_vram_bytes
        > 0
    )
    assert len(model_ids()) == 25


def test_targets_match_like_peft():
    qwen1 = ModelShape.from_config(QWEN1_7B)
    s = spec(method="lora", lora={"target_modules": ["mlp.c_proj"]})
    adapted = plan(s, qwen1, None).breakdown["trainable_params"]
    # only the MLP's c_proj (11008 -> 4096), not attn.c_proj: r=16 x (11008 + 4096) x 32 layers x 4 B
    assert adapted == 16 * (11008 + 4096) * 32 * 4


@pytest.mark.parametrize(
    "config, code",
    [
        (LLAMA, None),
        (LLAMA | {"model_type": "mistral", "sliding_window": 1024}, None),  # the varlen path applies the window
        (LLAMA | {"model_type": "gemma2"}, "unsupported_padding_free"),  # Gemma2Config soft-caps scores at 50
        (LLAMA | {"model_type": "gemma2", "attn_logit_softcapping": None}, None),
    ],
)
def test_padding_free_refused_where_attention_scores_are_soft_capped(config, code):
    s = spec(method="lora", training={"padding_free": True, "max_seq_length": 1024})
    if code is None:
        assert plan(s, ModelShape.from_config(config), None).peak_vram_bytes > 0
        return
    with pytest.raises(PlanRefused) as refused:
        plan(s, ModelShape.from_config(config), None)
    assert refused.value.code == code and "attn_logit_softcapping 50.0" in str(refused.value)
