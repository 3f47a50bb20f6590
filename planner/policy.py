"""What the worker does, said once: every fact that both the planner's arithmetic and the worker's training rely on.

Pure Python: the planner imports this to predict, the worker (worker/training) imports it to act, and
tests/worker/test_policy.py checks that the worker's torch objects obey it (dtypes, chunk size, rules).
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.spec import JobSpec, Objective, Precision

# ---- precision -------------------------------------------------------------------------------------------------
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True, slots=True)
class PrecisionPolicy:
    """How one spec.memory.precision stores and computes. Dtypes are torch's names (torch.bfloat16 ...)."""

    frozen_dtype: str  # weights that do not train; the 4-bit compute dtype for qlora
    trained_dtype: str  # master weights of full / freeze training (adapters are always fp32)
    autocast_dtype: str | None  # None: the forward runs in the weights' own dtype
    grad_scaler: bool  # fp16 needs loss scaling so small gradients do not flush to zero

    @property
    def frozen_bytes(self) -> int:
        return DTYPE_BYTES[self.frozen_dtype]

    @property
    def trained_bytes(self) -> int:
        return DTYPE_BYTES[self.trained_dtype]

    @property
    def autocast(self) -> bool:
        return self.autocast_dtype is not None


PRECISIONS: dict[Precision, PrecisionPolicy] = {
    Precision.bf16: PrecisionPolicy("bfloat16", "bfloat16", None, False),
    Precision.bf16_mixed: PrecisionPolicy("bfloat16", "float32", "bfloat16", False),
    Precision.fp16_mixed: PrecisionPolicy("float16", "float32", "float16", True),
    Precision.fp32: PrecisionPolicy("float32", "float32", None, False),
}
# LoRA/DoRA adapters train in fp32 whatever the precision: peft's LoraConfig(autocast_adapter_dtype=True).
ADAPTER_DTYPE = "float32"


# ---- the loss --------------------------------------------------------------------------------------------------
# The fused loss (worker/training/loss.py) runs lm_head + cross-entropy per chunk of this many positions: it
# bounds the fp32 logits alive at once to chunk x vocab.
FUSED_CHUNK_TOKENS = 1024
# memory.fused_loss None: the chunked loss is plain torch, so the worker runs it on every device.
FUSED_LOSS_DEFAULT = True


def fused_loss_enabled(spec: JobSpec) -> bool:
    return FUSED_LOSS_DEFAULT if spec.memory.fused_loss is None else spec.memory.fused_loss


# ---- compilation -----------------------------------------------------------------------------------------------
# memory.compile_layers None: off, until a GPU run shows regional compilation faster (issue 15). The planner
# assumes a compiled layer holds at its peak what the eager one holds (inductor frees intermediates at least as
# early): NOT MEASURED on a GPU.
COMPILE_LAYERS_DEFAULT = False


def compile_layers_enabled(spec: JobSpec) -> bool:
    return COMPILE_LAYERS_DEFAULT if spec.memory.compile_layers is None else spec.memory.compile_layers


# ---- Liger kernels ---------------------------------------------------------------------------------------------
# memory.liger_kernels None: off, until a GPU run measures it against the chunked loss (issue 15). The planner
# counts Liger's saved tensors (planner/terms.py) from liger-kernel 0.8.5's source, NOT MEASURED on a GPU.
LIGER_KERNELS_DEFAULT = False
# The families liger-kernel 0.8.5 patches (its MODEL_TYPE_TO_APPLY_LIGER_FN) whose layers the planner models as
# dense gated MLPs: the MoE ones (mixtral, qwen2_moe) keep transformers' modules.
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gemma2", "phi3"})


def liger_kernels_enabled(spec: JobSpec, model_type: str, default: bool = LIGER_KERNELS_DEFAULT) -> bool:
    """Whether a CUDA worker applies Liger to this job (default: the recipe's when the spec says None); a sharded
    job keeps the plain modules (the FSDP2 root runs the chunked loss as its own forward method), and so does a
    preference objective (Liger's fused cross-entropy keeps one scalar's gradient: it cannot weight each sequence)."""
    wanted = default if spec.memory.liger_kernels is None else spec.memory.liger_kernels
    one_loss = spec.resources.effective_sharding is None and spec.objective is Objective.sft
    return wanted and model_type in LIGER_MODEL_TYPES and one_loss


# ---- optimizers ------------------------------------------------------------------------------------------------
def offload_gradients(spec: JobSpec) -> bool:
    """cpu_offload frees a GPU gradient once it is copied to the host, but only without accumulation: a host copy
    is overwritten by every micro-step, not summed."""
    return spec.training.gradient_accumulation_steps == 1


def galore_projects(parameter_name: str, ndim: int) -> bool:
    """GaLore projects the 2-D weights of the decoder layers (the GaLore paper's choice); embeddings, lm_head,
    norms and biases keep ordinary Adam states."""
    return ndim == 2 and ".layers." in f".{parameter_name}"


# ---- which parameters a name selects ---------------------------------------------------------------------------
def module_name_matches(parameter_name: str, module_name: str) -> bool:
    """freeze.trainable_modules: 'mlp' matches 'model.layers.0.mlp.up_proj.weight' (whole dotted components,
    anywhere in the name); 'layers.3' matches all of layer 3."""
    return f".{module_name}." in f".{parameter_name}."


# ---- the CUDA caching allocator --------------------------------------------------------------------------------
# The worker's training process sets this before CUDA starts; the fitted fragmentation constants of
# planner/core.py (calibration/h100-worker.jsonl) were measured with it. An operator's own value is kept, and the
# plan and the job's log say the prediction no longer holds (planner.core.Plan.warnings).
ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOCATOR_CONF = "expandable_segments:True"


def expandable_segments(allocator_conf: str) -> bool:
    return "expandable_segments:true" in allocator_conf.replace(" ", "").lower()


# ---- the calibrated stack --------------------------------------------------------------------------------------
# Every calibration row (calibration/*.jsonl) was measured with these; the worker reports what it runs.
CALIBRATED_STACK = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "bitsandbytes": "0.50.2"}
