"""Turn a JobSpec into a device, a precision plan, a ready-to-train model, an optimizer and an LR schedule.

Precision mapping (spec.memory.precision), the same on CUDA and on the CPU:

    precision    frozen weights        trained weights (full/freeze)   autocast   loss scaling
    bf16         bf16                  bf16 (AdamW states too)         none       no
    bf16-mixed   bf16                  fp32 master weights             bf16       no
    fp16-mixed   fp16                  fp32 master weights             fp16       GradScaler
    fp32         fp32                  fp32                            none       no

- "frozen weights" is the dtype of whatever does not train: the whole base of lora, the non-quantised parts
  (embeddings, norms, lm_head) of qlora, the frozen layers of freeze. It is also the 4-bit compute dtype of
  qlora. Frozen weights are never upcast (no prepare_model_for_kbit_training): that would cost GiBs for nothing.
- LoRA/DoRA adapter weights are always fp32 (peft's default autocast_adapter_dtype=True): they are tiny, and
  fp32 keeps their small updates from rounding away.
- CPU autocast supports bf16 and fp16, and bitsandbytes 0.50 runs NF4 matmuls and its 8-bit/paged optimizers
  on the CPU (paged optimizers fall back to unpaged there, with a warning), so every method x optimizer x
  precision runs on the CPU, just slowly.

Learning-rate schedule: linear warmup over the first 3% of optimizer steps (at least one), then cosine decay
to 10% of the peak at the last step. AdamW everywhere with betas (0.9, 0.999), no weight decay (the spec has
no knob for it, and it is the usual choice for adapters); gradients are clipped to norm 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.spec import JobSpec, Method, Optimizer, Precision

WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 0.1
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class PrecisionPlan:
    frozen_dtype: torch.dtype  # weights that do not train; the 4-bit compute dtype for qlora
    trained_dtype: torch.dtype  # master weights of full / freeze training (adapters are always fp32)
    autocast_dtype: torch.dtype | None  # None: run the forward pass in the weights' own dtype
    grad_scaler: bool  # fp16 needs loss scaling so small gradients do not flush to zero


_PRECISIONS = {
    Precision.bf16: PrecisionPlan(torch.bfloat16, torch.bfloat16, None, False),
    Precision.bf16_mixed: PrecisionPlan(torch.bfloat16, torch.float32, torch.bfloat16, False),
    Precision.fp16_mixed: PrecisionPlan(torch.float16, torch.float32, torch.float16, True),
    Precision.fp32: PrecisionPlan(torch.float32, torch.float32, None, False),
}


def precision_plan(precision: Precision) -> PrecisionPlan:
    return _PRECISIONS[Precision(precision)]


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bnb_config(spec: JobSpec, plan: PrecisionPlan):
    from transformers import BitsAndBytesConfig

    options = spec.quantization_options
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=plan.frozen_dtype,
    )


def lora_config(spec: JobSpec):
    from peft import LoraConfig

    options = spec.lora_options
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        # peft's "all-linear" already leaves the output layer (lm_head) out.
        target_modules=options.target_modules,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model(spec: JobSpec, base_model_dir: Path, device: torch.device, plan: PrecisionPlan):
    """Load the base model for spec.method, with exactly the parameters that should train left trainable."""
    from transformers import AutoModelForCausalLM

    load_dtype = plan.trained_dtype if spec.method is Method.full else plan.frozen_dtype
    kwargs = {"dtype": load_dtype, "attn_implementation": "sdpa"}
    if device.type == "cuda":
        # Load straight onto the GPU instead of staging the whole model in host memory.
        kwargs["device_map"] = {"": device.index or 0}
    if spec.method is Method.qlora:
        kwargs["quantization_config"] = bnb_config(spec, plan)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing

    if spec.memory.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.method in (Method.lora, Method.qlora):
            # The frozen embeddings produce no grad-requiring tensor; adapters further up still need one.
            model.enable_input_require_grads()

    if spec.method in (Method.lora, Method.qlora):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec))  # freezes the base, adds fp32 adapters
    elif spec.method is Method.freeze:
        _train_last_layers(model, spec.freeze_options.trainable_layers, plan.trained_dtype)
    model.train()  # from_pretrained returns eval mode: dropout off, gradient checkpointing inactive
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of decoder blocks: the ModuleList as long as config.num_hidden_layers."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def _train_last_layers(model, trainable_layers: int, trained_dtype: torch.dtype) -> None:
    layers = decoder_layers(model)
    if trainable_layers > len(layers):
        raise ValueError(f"freeze.trainable_layers is {trainable_layers} but the model has {len(layers)} "
                         f"decoder layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers:]:
        # Only the layers that train get fp32 master weights under mixed precision; the rest stay in half.
        layer.to(trained_dtype)
        layer.requires_grad_(True)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def build_optimizer(spec: JobSpec, parameters: list[torch.nn.Parameter], device: torch.device):
    lr = spec.training.learning_rate
    common = {"lr": lr, "betas": (0.9, 0.999), "weight_decay": 0.0}
    choice = spec.memory.optimizer
    if choice is Optimizer.adamw:
        # The fused kernel is CUDA-only here; foreach is the fast path on the CPU.
        return torch.optim.AdamW(parameters, fused=device.type == "cuda", **common)
    import bitsandbytes as bnb

    optimizer_class = {
        Optimizer.adamw_8bit: bnb.optim.AdamW8bit,
        Optimizer.paged_adamw_8bit: bnb.optim.PagedAdamW8bit,
        Optimizer.paged_adamw_32bit: bnb.optim.PagedAdamW32bit,
    }[choice]
    return optimizer_class(parameters, **common)


def lr_factor(step: int, total_steps: int) -> float:
    """Multiplier of the peak LR for the optimizer step that follows `step` completed steps."""
    warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))
