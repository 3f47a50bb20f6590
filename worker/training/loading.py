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
host copies (clip_gradients). galore_adamw / galore_adamw_8bit = galore-torch's GaLoreAdamW(8bit), full and
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

from domain.spec import JobSpec, Method, Optimizer, Precision

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
    if options.bits == 8:  # LLM.int8: int8 weights with one fp32 scale per output row (Linear8bitLt)
        return BitsAndBytesConfig(load_in_8bit=True)
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
        init_lora_weights="pissa" if options.init == "pissa" else True,
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_model(spec: JobSpec, base_model_dir: Path, device: torch.device, plan: PrecisionPlan):
    """Load the base model for spec.method, with exactly the parameters that should train left trainable."""
    from transformers import AutoModelForCausalLM

    load_dtype = plan.trained_dtype if spec.method is Method.full else plan.frozen_dtype
    # safetensors only, whatever else the directory holds: a pickled checkpoint could run code when loaded.
    kwargs = {"dtype": load_dtype, "attn_implementation": "sdpa", "use_safetensors": True}
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
        if spec.lora_options.init == "pissa":
            _keep_pissa_initial_adapter(model)
    elif spec.method is Method.freeze and spec.freeze_options.trainable_modules is not None:
        _train_named_modules(model, spec.freeze_options.trainable_modules, plan.trained_dtype)
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
        raise ValueError(
            f"freeze.trainable_layers is {trainable_layers} but the model has {len(layers)} decoder layers"
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        # Only the layers that train get fp32 master weights under mixed precision; the rest stay in half.
        layer.to(trained_dtype)
        layer.requires_grad_(True)


def module_name_matches(parameter_name: str, module_name: str) -> bool:
    """'mlp' matches 'model.layers.0.mlp.up_proj.weight': whole dotted components, anywhere in the name."""
    return f".{module_name}." in f".{parameter_name}."


def _train_named_modules(model, names: list[str], trained_dtype: torch.dtype) -> None:
    """freeze.trainable_modules: exactly the parameters under the named modules train. A tied lm_head shares
    the embedding matrix, so naming either trains both."""
    model.requires_grad_(False)
    matched = {name: False for name in names}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):  # tied lm_head too
        hits = [name for name in names if module_name_matches(parameter_name, name)]
        for name in hits:
            matched[name] = True
        if hits:
            parameter.data = parameter.data.to(trained_dtype)  # fp32 master weights under -mixed
            parameter.requires_grad_(True)
    missing = [name for name, hit in matched.items() if not hit]
    if missing:
        raise ValueError(f"freeze.trainable_modules {missing} match no parameter of {type(model).__name__}")


def _keep_pissa_initial_adapter(model) -> None:
    """PiSSA moves the top singular directions out of the base weights into the adapter, so the trained adapter
    only fits that residual base. Keep the initial adapter so saving can convert the result into an ordinary LoRA
    adapter of the original base (peft: save_pretrained(path_initial_model_for_weight_conversion=...))."""
    import tempfile

    initial = Path(tempfile.mkdtemp(prefix="ftjobs-pissa-init-"))
    config = model.peft_config["default"]
    config.init_lora_weights = True  # peft requires this flag on the saved initial adapter
    model.save_pretrained(initial)
    config.init_lora_weights = "pissa"
    model.ftjobs_pissa_initial = initial


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


CUDA_ONLY_OPTIMIZERS = {
    Optimizer.cpu_offload: "torchao CPUOffloadOptimizer offloads GPU optimizer states to the host, so it needs a "
    "CUDA device",
    Optimizer.galore_adamw_8bit: "galore-torch's GaLoreAdamW8bit synchronizes CUDA in every step",
}


def check_device_support(spec: JobSpec, device: torch.device) -> None:
    """Refuse, before any model load, what this device cannot run."""
    from domain.errors import UnsupportedOnDevice

    reason = CUDA_ONLY_OPTIMIZERS.get(spec.memory.optimizer)
    if reason and device.type != "cuda":
        raise UnsupportedOnDevice(
            f"optimizer {spec.memory.optimizer.value} is not supported on a {device.type} worker: {reason}",
            optimizer=spec.memory.optimizer.value,
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
    """galore-torch projects the params of a group that carries `rank`: the 2-D weights of the decoder layers
    (the GaLore paper's choice); embeddings, lm_head, norms and biases keep ordinary Adam states."""
    projected = [p for name, p in named if p.ndim == 2 and ".layers." in f".{name}"]
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
    lr = spec.training.learning_rate
    common = {"lr": lr, "betas": (0.9, 0.999), "weight_decay": 0.0}
    choice = spec.memory.optimizer
    if choice is Optimizer.adamw:
        # The fused kernel is CUDA-only here; foreach is the fast path on the CPU.
        return torch.optim.AdamW(parameters, fused=device.type == "cuda", **common)
    if choice is Optimizer.adamw_4bit:
        from torchao.optim import AdamW4bit

        return AdamW4bit(parameters, **common)
    if choice is Optimizer.cpu_offload:
        check_device_support(spec, device)
        from torchao.optim import CPUOffloadOptimizer

        # Host grads are overwritten by every micro-step's copy: free the GPU ones only without accumulation.
        offload_gradients = spec.training.gradient_accumulation_steps == 1
        return CPUOffloadOptimizer(
            parameters, torch.optim.AdamW, offload_gradients=offload_gradients, fused=True, **common
        )
    if choice.is_galore:
        check_device_support(spec, device)
        from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

        from worker.training import galore

        if choice is Optimizer.galore_adamw:
            optimizer = GaLoreAdamW(parameters, eps=1e-8, no_deprecation_warning=True, **common)
        else:
            optimizer = GaLoreAdamW8bit(parameters, **common)
        galore.install_projectors(optimizer)
        return optimizer
    import bitsandbytes as bnb

    optimizer_class = {
        Optimizer.adamw_8bit: bnb.optim.AdamW8bit,
        Optimizer.paged_adamw_8bit: bnb.optim.PagedAdamW8bit,
        Optimizer.paged_adamw_32bit: bnb.optim.PagedAdamW32bit,
    }[choice]
    return optimizer_class(parameters, **common)


def clip_gradients(optimizer, parameters, max_norm: float = MAX_GRAD_NORM) -> torch.Tensor:
    """clip_grad_norm_ over the gradients the optimizer will read: for CPUOffloadOptimizer the host copies of
    the offloaded params (their GPU grads may already be freed) plus the GPU grads of the small ones it keeps."""
    host_map = getattr(optimizer, "param_d2h_map", None)
    if host_map is None:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    optimizer.stream.synchronize()  # the device->host grad copies run on the optimizer's side stream
    host = [p.grad for p in host_map.values()]
    kept = [p.grad for group in optimizer.d_param_groups for p in group["params"] if p.grad is not None]
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in host]
    norms += [torch.linalg.vector_norm(g, dtype=torch.float32).cpu() for g in kept]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in host:
        g.mul_(factor)
    for g in kept:
        g.mul_(factor.to(g.device))
    return total


def lr_factor(step: int, total_steps: int) -> float:
    """Multiplier of the peak LR for the optimizer step that follows `step` completed steps."""
    warmup_steps = max(1, round(WARMUP_FRACTION * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_schedule(optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps))
