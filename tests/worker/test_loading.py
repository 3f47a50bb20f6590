"""worker.training.loading: the model is lean (frozen weights stay in half precision, nothing upcast), exactly
the right parameters train, and optimizers / schedule follow the spec."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from domain.spec import Precision
from worker.training import loading

CPU = torch.device("cpu")


def load(make_spec, tiny_llama, method, **spec_fields):
    spec = make_spec(method, **spec_fields)
    return loading.load_model(spec, tiny_llama, CPU, loading.precision_plan(spec.memory.precision))


def dtypes(parameters) -> set[torch.dtype]:
    return {parameter.dtype for parameter in parameters}


def test_qlora_is_nf4_with_fp32_adapters_and_nothing_upcast(make_spec, tiny_llama):
    model = load(make_spec, tiny_llama, "qlora")
    linear4bit = [name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert len(linear4bit) == 2 * 7  # q, k, v, o, gate, up, down in both layers
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16  # not quantised, not adapted, not upcast
    named = dict(model.named_parameters())
    trainable = {name for name, parameter in named.items() if parameter.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert dtypes(named[name] for name in trainable) == {torch.float32}
    frozen_float = [p for name, p in named.items() if name not in trainable and p.dtype.is_floating_point]
    assert dtypes(frozen_float) == {torch.bfloat16}  # embeddings and norms too: no prepare_model_for_kbit_training
    assert model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.quant_state.quant_type == "nf4"


def test_lora_options_reach_peft(make_spec, tiny_llama):
    model = load(
        make_spec,
        tiny_llama,
        "lora",
        lora={"r": 4, "alpha": 8, "use_dora": True, "use_rslora": True, "target_modules": ["q_proj"]},
    )
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.use_dora, config.use_rslora) == (4, 8, True, True)
    assert config.target_modules == {"q_proj"}
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector  # DoRA is on
    assert model.is_gradient_checkpointing and model.training


@pytest.mark.parametrize(
    "precision, trained, frozen",
    [
        ("bf16", torch.bfloat16, torch.bfloat16),
        ("bf16-mixed", torch.float32, torch.bfloat16),
        ("fp16-mixed", torch.float32, torch.float16),
        ("fp32", torch.float32, torch.float32),
    ],
)
def test_freeze_precision(make_spec, tiny_llama, precision, trained, frozen):
    model = load(make_spec, tiny_llama, "freeze", memory={"precision": precision}, freeze={"trainable_layers": 1})
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(name.startswith("model.layers.1.") for name in trainable)
    assert dtypes(model.model.layers[1].parameters()) == {trained}
    assert dtypes(model.model.layers[0].parameters()) | {model.lm_head.weight.dtype} == {frozen}


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("bf16-mixed", torch.float32)])
def test_full_trains_everything_in_the_master_dtype(make_spec, tiny_llama, precision, dtype):
    model = load(make_spec, tiny_llama, "full", memory={"precision": precision})
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert dtypes(model.parameters()) == {dtype}


def test_precision_plans():
    assert loading.precision_plan(Precision.fp16_mixed) == loading.PrecisionPlan(
        torch.float16, torch.float32, torch.float16, True
    )
    assert loading.precision_plan("bf16").autocast_dtype is None


@pytest.mark.parametrize(
    "choice, optimizer_class",
    [
        ("adamw", torch.optim.AdamW),
        ("adamw_8bit", bnb.optim.AdamW8bit),
        ("paged_adamw_8bit", bnb.optim.PagedAdamW8bit),
        ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit),
    ],
)
def test_optimizer_choice(make_spec, choice, optimizer_class):
    spec = make_spec("lora", memory={"optimizer": choice}, training={"learning_rate": 3e-4})
    optimizer = loading.build_optimizer(spec, [torch.nn.Parameter(torch.zeros(4))], CPU)
    assert type(optimizer) is optimizer_class
    assert optimizer.param_groups[0]["lr"] == 3e-4 and optimizer.param_groups[0]["weight_decay"] == 0.0


def test_schedule_warms_up_then_decays_to_a_tenth():
    total = 100
    factors = [loading.lr_factor(step, total) for step in range(total)]
    assert factors[0] == pytest.approx(1 / 3) and factors[2] == 1.0  # 3 warmup steps
    assert all(later <= earlier for earlier, later in zip(factors[2:], factors[3:], strict=False))
    assert factors[-1] == pytest.approx(0.1, abs=0.01)
    assert loading.lr_factor(0, 1) == 1.0  # a one-step job trains at the peak LR
