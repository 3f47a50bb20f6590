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
- CPU autocast supports bf16 and fp16, and bitsandbytes 0.50 runs NF4/FP4 and LLM.int8 matmuls and its
  8-bit/paged optimizers on the CPU (paged optimizers fall back to unpaged there, with a warning), and torchao's
  AdamW4bit runs there too (torch.compile), so every method x precision runs on the CPU with every optimizer
  but cpu_offload, which needs a GPU to offload from, and galore_adamw_8bit, whose step calls
  torch.cuda.synchronize(): a CPU-only worker refuses them (UnsupportedOnDevice) before loading anything.

Optimizers (spec.memory.optimizer): adamw = torch AdamW (fused on CUDA); adamw_8bit / paged_adamw_8bit /
paged_adamw_32bit = bitsandbytes; adamw_4bit = torchao AdamW4bit (4-bit states in blocks of 128 with an fp32
scale each; tensors under 4096 elements keep full-precision states); cpu_offload = torchao CPUOffloadOptimizer
around torch AdamW: fp32 master copies and AdamW states live in pinned host memory and the step runs on the CPU;
the GPU keeps only the params (and the states of tensors under 4096 elements). Its gradients move to the host as
backward produces them and are freed on the GPU (offload_gradients) when there is no gradient accumulation; with
accumulation they stay on the GPU (the host copy would be overwritten, not summed). Clipping then runs on the
host copies (optimizers.clip_offloaded). galore_adamw / galore_adamw_8bit = galore-torch's GaLoreAdamW(8bit), full and
freeze only: the decoder layers' 2-D weights keep their states on a low-rank projection (galore_groups).
LoRA+ (lora.loraplus_lr_ratio): lora_B (and DoRA magnitudes) form a second param
group at learning_rate x ratio, as peft.optimizers.create_loraplus_optimizer groups them.

Learning-rate schedule: linear warmup over the first 3% of optimizer steps (at least one), then cosine decay
to 10% of the peak at the last step. AdamW everywhere with betas (0.9, 0.999), no weight decay (the spec has
no knob for it, and it is the usual choice for adapters); gradients are clipped to norm 1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from domain.spec import JobSpec, Precision
from planner import policy
from planner.methods import method_traits
from planner.optimizers import OPTIMIZERS as OPTIMIZER_TRAITS
from worker.training import kernels
from worker.training.methods import METHODS
from worker.training.optimizers import OPTIMIZERS

WARMUP_FRACTION = 0.03
FINAL_LR_FRACTION = 0.1
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class PrecisionPlan:
    frozen_dtype: torch.dtype  # weights that do not train; the 4-bit compute dtype for qlora
    trained_dtype: torch.dtype  # master weights of full / freeze training (adapters are always fp32)
    autocast_dtype: torch.dtype | None  # None: run the forward pass in the weights' own dtype
    grad_scaler: bool  # fp16 needs loss scaling so small gradients do not flush to zero


def _torch_plan(rule: policy.PrecisionPolicy) -> PrecisionPlan:
    def dtype(name: str | None) -> torch.dtype | None:
        return None if name is None else getattr(torch, name)

    return PrecisionPlan(
        dtype(rule.frozen_dtype), dtype(rule.trained_dtype), dtype(rule.autocast_dtype), rule.grad_scaler
    )


# The planner's precision policy in torch's terms: the planner predicts memory from the same table.
_PRECISIONS = {precision: _torch_plan(rule) for precision, rule in policy.PRECISIONS.items()}


def precision_plan(precision: Precision) -> PrecisionPlan:
    return _PRECISIONS[Precision(precision)]


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bnb_config(spec: JobSpec, plan: PrecisionPlan):
    from transformers import BitsAndBytesConfig

    options = spec.quantization_options
    if options.bits == 8:  # LLM.int8: int8 weights with one fp32 scale per output row (Linear8bitLt)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.quant_type,
        bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=plan.frozen_dtype,
    )


def attention_implementation(spec: JobSpec) -> str:
    """training.padding_free: the varlen attention of worker/training/attention.py (no mask); else sdpa."""
    if not spec.training.padding_free:
        return "sdpa"
    from worker.training.attention import VARLEN_ATTENTION  # registers it with transformers

    return VARLEN_ATTENTION


def load_model(spec: JobSpec, base_model_dir: Path, device: torch.device, plan: PrecisionPlan):
    """Load the base model for spec.method, with exactly the parameters that should train left trainable."""
    from transformers import AutoModelForCausalLM

    traits = method_traits(spec)
    load_dtype = plan.trained_dtype if traits.loads_trained_dtype else plan.frozen_dtype
    # safetensors only, whatever else the directory holds: a pickled checkpoint could run code when loaded.
    kwargs = {"dtype": load_dtype, "attn_implementation": attention_implementation(spec), "use_safetensors": True}
    if device.type == "cuda":
        # Load straight onto the GPU instead of staging the whole model in host memory.
        kwargs["device_map"] = {"": device.index or 0}
    if traits.quantized:
        kwargs["quantization_config"] = bnb_config(spec, plan)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if kernels.liger_applies(spec, model.config.model_type, device):
        kernels.apply_liger(model)  # on the base model's modules, before peft wraps them

    if spec.memory.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = METHODS[spec.method].prepare(spec, model, plan)
    model.train()  # from_pretrained returns eval mode: dropout off, gradient checkpointing inactive
    return model


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def check_device_support(spec: JobSpec, device: torch.device) -> None:
    """Refuse, before any model load, what this device cannot run."""
    from domain.errors import UnsupportedOnDevice

    reason = OPTIMIZER_TRAITS[spec.memory.optimizer].cuda_only
    if reason and device.type != "cuda":
        raise UnsupportedOnDevice(
            f"optimizer {spec.memory.optimizer.value} is not supported on a {device.type} worker: {reason}",
            optimizer=spec.memory.optimizer.value,
        )
    if spec.resources.offload.value != "none" and device.type != "cuda":
        raise UnsupportedOnDevice(
            f"resources.offload {spec.resources.offload.value} moves GPU memory to the host: a {device.type} "
            "worker has none to move"
        )


def parameter_groups(spec: JobSpec, model) -> list[dict]:
    """One group at the spec's LR; with LoRA+ a second one for lora_B and 1-D adapter params (DoRA magnitude)
    at LR x ratio (peft.optimizers.loraplus grouping; this model has no LoRA embeddings)."""
    lr = spec.training.learning_rate
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    galore = spec.galore_options
    if galore:
        return galore_groups(named, lr, galore)
    ratio = spec.lora_options.loraplus_lr_ratio if spec.lora_options else None
    if not ratio:
        return [{"params": [p for _, p in named], "lr": lr}]
    fast = [p for name, p in named if "lora_B" in name or p.ndim == 1]
    slow = [p for name, p in named if not ("lora_B" in name or p.ndim == 1)]
    return [group for group in ({"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}) if group["params"]]


def galore_groups(named: list[tuple[str, torch.nn.Parameter]], lr: float, galore) -> list[dict]:
    """galore-torch projects the params of a group that carries `rank`: those policy.galore_projects selects."""
    projected = [p for name, p in named if policy.galore_projects(name, p.ndim)]
    ids = {id(p) for p in projected}
    plain = [p for _, p in named if id(p) not in ids]
    options = {
        "rank": galore.rank,
        "update_proj_gap": galore.update_proj_gap,
        "scale": galore.scale,
        "proj_type": galore.proj_type,
    }
    return [
        group for group in ({"params": projected, "lr": lr, **options}, {"params": plain, "lr": lr}) if group["params"]
    ]


def build_optimizer(spec: JobSpec, parameters, device: torch.device):
    """`parameters`: a list of params, or param groups (parameter_groups) each with its own lr."""
    return OPTIMIZERS[spec.memory.optimizer].build(spec, parameters, device)


def model_optimizer(spec: JobSpec, model, device: torch.device):
    """The optimizer of the model's trainable parameters, wrapped where the registry entry drives it (BAdam)."""
    recipe = OPTIMIZERS[spec.memory.optimizer]
    optimizer = build_optimizer(spec, parameter_groups(spec, model), device)
    return recipe.wrap(spec, model, optimizer) if recipe.wrap else optimizer


def lr_factor(step: int, total_steps: int) -> float:
    """Multiplier of the peak LR for the optimizer step that follows `step` completed steps."""
    warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))
