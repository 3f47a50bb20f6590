"""The job spec: the v1 contract shared by the API, the planner and the worker.

Every model forbids unknown fields, so a typo is an error rather than a silently ignored option.
Cross-field rules (an option that belongs to another method) are checked once, on the whole spec,
and all of them are reported together.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class Method(str, enum.Enum):
    qlora = "qlora"
    lora = "lora"
    full = "full"
    freeze = "freeze"


class DatasetFormat(str, enum.Enum):
    alpaca = "alpaca"
    sharegpt = "sharegpt"
    messages = "messages"
    text = "text"
    preference = "preference"  # TRL's prompt / chosen / rejected, as text or as messages
    openai_preference = "openai_preference"  # OpenAI's input.messages / preferred_output / non_preferred_output
    kto = "kto"  # KTO's unpaired prompt / completion / label

    @property
    def is_preference(self) -> bool:
        return self in (DatasetFormat.preference, DatasetFormat.openai_preference)


class Objective(str, enum.Enum):
    sft = "sft"  # supervised: the loss of the assistant tokens
    dpo = "dpo"  # Direct Preference Optimization (Rafailov et al., 2023) on chosen/rejected pairs
    kto = "kto"  # Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired completions labelled good/bad
    orpo = "orpo"  # Odds Ratio Preference Optimization (Hong et al., 2024): SFT + an odds-ratio term, no reference

    @property
    def needs_reference(self) -> bool:
        return self in (Objective.dpo, Objective.kto)

    @property
    def dataset_formats(self) -> tuple[DatasetFormat, ...]:
        if self is Objective.kto:
            return (DatasetFormat.kto,)
        if self is Objective.sft:
            return tuple(fmt for fmt in DatasetFormat if not fmt.is_preference and fmt is not DatasetFormat.kto)
        return (DatasetFormat.preference, DatasetFormat.openai_preference)


class Precision(str, enum.Enum):
    bf16 = "bf16"  # weights and optimizer states held in bf16
    bf16_mixed = "bf16-mixed"  # fp32 master weights under bf16 autocast
    fp16_mixed = "fp16-mixed"  # fp32 master weights under fp16 autocast with loss scaling
    fp32 = "fp32"


class Optimizer(str, enum.Enum):
    adamw = "adamw"
    adamw_8bit = "adamw_8bit"
    paged_adamw_8bit = "paged_adamw_8bit"
    paged_adamw_32bit = "paged_adamw_32bit"
    adamw_4bit = "adamw_4bit"  # torchao AdamW4bit: 4-bit block-quantized states
    cpu_offload = "cpu_offload"  # torchao CPUOffloadOptimizer around torch AdamW: states on the host (CUDA only)
    galore_adamw = "galore_adamw"  # galore-torch GaLoreAdamW: Adam states on a low-rank projection (full/freeze)
    galore_adamw_8bit = "galore_adamw_8bit"  # galore-torch GaLoreAdamW8bit: the same with 8-bit states (CUDA only)
    badam = "badam"  # BAdam: Adam on one block of decoder layers at a time, switched every K steps (full only)

    @property
    def is_galore(self) -> bool:
        return self in (Optimizer.galore_adamw, Optimizer.galore_adamw_8bit)


def _plain_text(value: str) -> str:
    # A NUL cannot be stored in PostgreSQL text or JSONB, a lone surrogate has no UTF-8 form, and control
    # characters in a path or name only ever hide something.
    if any(not ch.isprintable() or "\ud800" <= ch <= "\udfff" for ch in value):
        raise ValueError("must not contain control characters, NUL bytes or unpaired surrogates")
    return value


PlainText = Annotated[str, AfterValidator(_plain_text)]
# Seeds go to torch.manual_seed, numpy and random; numpy takes at most 32 bits.
MAX_SEED = 2**32 - 1
# Beyond these no real job goes, and the worker's arithmetic (steps x batch x tokens) stays far from overflow.
MAX_STEPS = 10_000_000


# Inside each checkpoint the worker stores: the API lists the first and serves the second as a download.
CHECKPOINT_METRICS_FILE = "metrics.json"
CHECKPOINT_ADAPTER_DIR = "adapter"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(_Strict):
    file_id: str | None = Field(None, pattern=r"^file_[A-Za-z0-9]{8,64}$", description="An uploaded file's id")
    path: PlainText | None = Field(
        None, min_length=1, max_length=1024, description="Relative to the data root; it may not lead outside it"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> DatasetRef:
        if (self.file_id is None) == (self.path is None):
            raise ValueError("give exactly one of file_id or path")
        return self


class LoraOptions(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0, le=65536)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.]+$")]] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    init: Literal["default", "pissa"] = Field(
        "default", description="'pissa': adapters start from the principal singular vectors (lora only, not qlora)"
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, le=1024, description="LoRA+: the B matrices train at learning_rate x this ratio"
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Literal["all-linear"] | list[str]) -> Literal["all-linear"] | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules must name at least one module, or be 'all-linear'")
        return value


class QuantizationOptions(_Strict):
    bits: Literal[4, 8] = Field(4, description="4: NF4/FP4 (bitsandbytes Linear4bit); 8: LLM.int8 (Linear8bitLt)")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type; 4-bit only")
    double_quant: bool = Field(True, description="Quantize the 4-bit absmax too; 4-bit only")

    @model_validator(mode="after")
    def _four_bit_options(self) -> QuantizationOptions:
        if self.bits == 8 and self.model_fields_set & {"quant_type", "double_quant"}:
            raise ValueError("quant_type and double_quant apply to bits=4 only")
        return self


class GaloreOptions(_Strict):
    """GaLore (Zhao et al., 2024): each 2-D weight of the decoder layers keeps its Adam states on a rank-`rank`
    projection of its gradient, refreshed by an SVD every `update_proj_gap` steps; the update is projected back
    and scaled by `scale`. Defaults: the galore-torch README's."""

    rank: int = Field(128, ge=1, le=8192)
    update_proj_gap: int = Field(200, ge=1, le=100_000, description="Optimizer steps between SVD refreshes")
    scale: float = Field(0.25, gt=0, le=100)
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"


class BadamOptions(_Strict):
    """BAdam (Luo et al., 2024): block-coordinate Adam for full fine-tuning. The decoder layers are cut into
    blocks of `layers_per_block`; one block at a time holds fp32 master weights, gradients and Adam states and
    trains for `switch_every_steps` optimizer steps, then the next one takes over. Embeddings, lm_head and the
    final norm stay frozen. Defaults: the badam package's (LLaMA-Factory's use_badam), in ascending order."""

    switch_every_steps: int = Field(50, ge=1, le=100_000, description="Optimizer steps before the next block")
    block_order: Literal["ascending", "descending", "random"] = Field(
        "ascending", description="random: a fresh permutation of the blocks each time all have trained"
    )
    layers_per_block: int = Field(1, ge=1, le=4096, description="Consecutive decoder layers in one block")


Reference = Literal["adapter_disabled", "precomputed", "copy"]
_REFERENCE_FIELD = Field(
    None,
    description="Where the reference policy's log-probabilities come from: adapter_disabled (lora/qlora: the same "
    "model, adapters off, no second copy), precomputed (a first pass over the dataset before training, stored with "
    "the job's files and reused on resume) or copy (a frozen copy of the base, full/freeze). None: adapter_disabled "
    "for lora and qlora, precomputed for full and freeze",
)


class DpoOptions(_Strict):
    """objective dpo."""

    beta: float = Field(0.1, gt=0, le=100, description="How far the policy may move from the reference")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's log-sigmoid; ipo: IPO's squared loss on per-token log-ratios"
    )
    reference: Reference | None = _REFERENCE_FIELD


class KtoOptions(_Strict):
    """objective kto: each completion's reward against a batch estimate of the policy's KL from the reference,
    on mismatched (prompt, another row's completion) sequences."""

    beta: float = Field(0.1, gt=0, le=100, description="How far the policy may move from the reference")
    desirable_weight: float = Field(1.0, gt=0, le=100, description="The weight of the completions labelled true")
    undesirable_weight: float = Field(1.0, gt=0, le=100, description="The weight of the completions labelled false")
    reference: Reference | None = _REFERENCE_FIELD


class OrpoOptions(_Strict):
    beta: float = Field(0.1, gt=0, le=100, description="The weight of the odds-ratio term against the SFT loss")


class FreezeOptions(_Strict):
    trainable_layers: int = Field(2, ge=1, le=4096, description="The last N decoder layers train; the rest stay frozen")
    trainable_modules: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")]] | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Instead of trainable_layers: exactly the parameters under modules with these names train. "
        "A name matches whole dotted components of a parameter's name: 'mlp' (every layer's MLP), "
        "'q_proj', 'layers.3' (all of layer 3), 'layers.3.mlp', 'lm_head', 'embed_tokens'",
    )

    @model_validator(mode="after")
    def _layers_or_modules(self) -> FreezeOptions:
        if self.trainable_modules is not None and "trainable_layers" in self.model_fields_set:
            raise ValueError("give trainable_layers or trainable_modules, not both")
        return self


class TrainingOptions(_Strict):
    epochs: float = Field(1, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Overrides epochs when set")
    micro_batch_size: int | Literal["auto"] = Field(
        4, description="Sequences per forward pass; 'auto' picks the largest that fits the GPU"
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    max_seq_length: int = Field(1024, ge=8, le=262144)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    logging_steps: int = Field(1, ge=1, le=MAX_STEPS, description="Progress is recorded every N optimizer steps")
    packing: bool = Field(False, description="Pack examples into rows of max_seq_length; no attention across them")
    padding_free: bool = Field(
        False,
        description="Run each micro-batch as one row of its examples end to end: no padding, no attention mask, "
        "attention bounded per example (FlashAttention varlen on CUDA)",
    )
    validation_fraction: float | None = Field(
        None, gt=0, le=0.5, description="Hold out this share of the examples (seeded) and report eval loss on it"
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, le=MAX_STEPS, description="Save a resumable checkpoint every N optimizer steps; None saves none"
    )
    checkpoint_every_epoch: bool = Field(
        False,
        description="Also save a checkpoint at the end of each epoch and at the last step, as OpenAI does; "
        "the OpenAI-compatible route turns it on",
    )
    keep_checkpoints: int = Field(
        2, ge=1, le=100, description="How many of the newest checkpoints are kept, after the job ends too"
    )

    @field_validator("micro_batch_size")
    @classmethod
    def _positive(cls, value: int | Literal["auto"]) -> int | Literal["auto"]:
        if isinstance(value, int) and not 1 <= value <= 4096:
            raise ValueError("micro_batch_size must be between 1 and 4096, or 'auto'")
        return value


class MemoryOptions(_Strict):
    precision: Precision = Precision.bf16_mixed
    optimizer: Optimizer = Optimizer.adamw
    gradient_checkpointing: bool = True
    fused_loss: bool | None = Field(
        None,
        description="Chunked lm_head + cross-entropy (the full logits are never held). None: on wherever the "
        "worker's kernel runs - it is plain torch, so on every device; false turns it off",
    )
    compile_layers: bool | None = Field(
        None,
        description="torch.compile each decoder layer (regional compilation), compiled before the first step and "
        "reported as its own phase. None: the worker's default, off until measured faster on a GPU",
    )
    offload_activations: bool = Field(
        False,
        description="Keep what the forward saves for the backward in host memory (with gradient checkpointing, "
        "each layer's input): the GPU holds one layer's worth at a time, the host the rest; one GPU only",
    )
    liger_kernels: bool | None = Field(
        None,
        description="On CUDA, liger-kernel's fused RMSNorm, SwiGLU/GeGLU and RoPE in the model and its fused "
        "linear cross-entropy as the loss (llama, mistral, qwen2, gemma2, phi3; not sharded). The CPU keeps the "
        "plain modules and the chunked loss. None: the worker's default, off until measured on a GPU",
    )


class OutputOptions(_Strict):
    merge_adapter: bool = Field(
        False, description="lora/qlora: also save the base with the adapter merged in, bf16 safetensors (model/)"
    )
    suffix: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Part of the result's name (OpenAI's fine_tuned_model)",
    )


class Sharding(str, enum.Enum):
    zero2 = "zero2"  # FSDP2 fully_shard(reshard_after_forward=False): grads and states sharded, params kept whole
    zero3 = "zero3"  # FSDP2 fully_shard(reshard_after_forward=True): params, grads and states sharded


class Offload(str, enum.Enum):
    none = "none"
    optimizer = "optimizer"  # the optimizer states and step on the host; sharded params and grads stay on the GPU
    params = "params"  # FSDP2 CPUOffloadPolicy: sharded params, grads and optimizer states on the host


class Resources(_Strict):
    gpu_memory_gib: float | None = Field(None, gt=0, le=4096, description="Plan against this GPU size")
    num_gpus: int = Field(
        1,
        ge=1,
        le=8,
        description="GPUs of one machine, one rank each (torchrun); more than one "
        "shards the model with FSDP2 (resources.sharding)",
    )
    sharding: Sharding | None = Field(
        None,
        description="zero3: params, grads and optimizer states sharded; zero2: grads and states sharded, params "
        "kept whole from forward to backward. None: zero3 when num_gpus > 1, no FSDP on one GPU",
    )
    offload: Offload = Field(
        Offload.none,
        description="Move the sharded optimizer states ('optimizer') or params, "
        "grads and states ('params') to host memory; needs sharding",
    )

    @property
    def effective_sharding(self) -> Sharding | None:
        """The FSDP2 strategy the job runs with: zero3 by default on more than one GPU."""
        if self.sharding is None and self.num_gpus > 1:
            return Sharding.zero3
        return self.sharding

    @model_validator(mode="after")
    def _offload_needs_sharding(self) -> Resources:
        if self.offload is not Offload.none and self.effective_sharding is None:
            raise ValueError("resources.offload needs FSDP2 sharding: set resources.sharding or num_gpus > 1")
        return self


class JobSpec(_Strict):
    base_model: PlainText = Field(
        ...,
        min_length=1,
        max_length=1024,
        description="A directory under the server's model roots holding config.json and safetensors weights "
        "(absolute, or relative to a root), or a hub id found in the local cache",
    )
    dataset: DatasetRef | None = Field(None, description="Required to submit a job; optional for a plan")
    validation_dataset: DatasetRef | None = Field(
        None,
        description="Held-out examples in dataset_format, for the eval loss (OpenAI's validation_file); "
        "instead of training.validation_fraction",
    )
    dataset_format: DatasetFormat = DatasetFormat.alpaca
    method: Method = Method.qlora
    lora: LoraOptions | None = None
    quantization: QuantizationOptions | None = None
    freeze: FreezeOptions | None = None
    galore: GaloreOptions | None = Field(None, description="Options of the galore_adamw(_8bit) optimizers")
    badam: BadamOptions | None = Field(None, description="Options of the badam optimizer")
    objective: Objective = Field(
        Objective.sft,
        description="sft, or preference tuning: dpo or orpo on chosen/rejected pairs, kto on labelled completions",
    )
    dpo: DpoOptions | None = Field(None, description="Options of objective dpo")
    kto: KtoOptions | None = Field(None, description="Options of objective kto")
    orpo: OrpoOptions | None = Field(None, description="Options of objective orpo")
    training: TrainingOptions = TrainingOptions()
    memory: MemoryOptions = MemoryOptions()
    output: OutputOptions = OutputOptions()
    resources: Resources = Resources()
    metadata: dict[Annotated[PlainText, Field(max_length=64)], Annotated[PlainText, Field(max_length=512)]] = Field(
        default_factory=dict, max_length=32
    )

    @model_validator(mode="after")
    def _options_match_method(self) -> JobSpec:
        problems = []
        adapters = self.method in (Method.lora, Method.qlora)
        if self.lora is not None and not adapters:
            problems.append(f"'lora' options apply to lora and qlora, not {self.method.value}")
        if self.quantization is not None and self.method is not Method.qlora:
            problems.append(f"'quantization' applies to qlora only, not {self.method.value}")
        if self.validation_dataset is not None and self.training.validation_fraction is not None:
            problems.append("give validation_dataset or training.validation_fraction, not both")
        if self.freeze is not None and self.method is not Method.freeze:
            problems.append(f"'freeze' applies to the freeze method only, not {self.method.value}")
        if self.lora is not None and self.lora.init == "pissa" and self.method is Method.qlora:
            # peft LoraLayer.pissa_init refuses a quantized base weight (it needs the SVD of the real weight)
            problems.append("lora.init 'pissa' needs an unquantized base: use method lora, not qlora")
        if self.output.merge_adapter and not adapters:
            problems.append(f"output.merge_adapter applies to lora and qlora, not {self.method.value}")
        if self.memory.optimizer.is_galore and adapters:
            problems.append(
                f"optimizer {self.memory.optimizer.value} projects full-rank weight gradients: use it "
                f"with full or freeze; {self.method.value}'s adapters are already low-rank"
            )
        if self.galore is not None and not self.memory.optimizer.is_galore:
            problems.append("'galore' options apply to the galore_adamw and galore_adamw_8bit optimizers")
        if self.memory.optimizer is Optimizer.cpu_offload and self.memory.precision is Precision.fp16_mixed:
            problems.append("optimizer cpu_offload cannot unscale fp16 loss-scaled gradients: use bf16-mixed")
        problems += self._badam_problems() + self._sharding_problems() + self._objective_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _badam_problems(self) -> list[str]:
        """BAdam keeps the model in bf16 with fp32 masters of one block (badam 1.4 BlockOptimizer): full
        fine-tuning under bf16 autocast, on one GPU."""
        if self.memory.optimizer is not Optimizer.badam:
            return ["'badam' options apply to the badam optimizer"] if self.badam is not None else []
        problems = []
        if self.method is not Method.full:
            problems.append(
                f"optimizer badam trains the decoder layers block by block: use method full, not {self.method.value}"
            )
        if self.memory.precision is not Precision.bf16_mixed:
            problems.append(
                "optimizer badam keeps the model in bf16 and fp32 masters of the active block: use precision "
                f"bf16-mixed, not {self.memory.precision.value}"
            )
        if self.resources.effective_sharding is not None:
            problems.append("optimizer badam runs on one GPU: its block switch re-creates the optimizer's params")
        return problems

    def _objective_problems(self) -> list[str]:
        """Preference objectives train on their own data formats, and need a reference the method can give."""
        objective = self.objective
        problems = [
            f"'{name}' options apply to objective {name}"
            for name in ("dpo", "kto", "orpo")
            if getattr(self, name) is not None and objective.value != name
        ]
        if self.dataset_format not in objective.dataset_formats:
            formats = " or ".join(fmt.value for fmt in objective.dataset_formats)
            problems.append(
                f"objective {objective.value} trains on dataset_format {formats}, not {self.dataset_format.value}"
            )
        problems += self._reference_problems()
        if objective is not Objective.sft and self.memory.liger_kernels:
            problems.append(
                f"objective {objective.value} weights every sequence's log-probability, and Liger's fused "
                "cross-entropy keeps one scalar's gradient: leave memory.liger_kernels unset (fused_loss applies)"
            )
        if objective is not Objective.sft and self.training.packing:
            problems.append(f"objective {objective.value} scores whole sequences: training.packing is sft only")
        if objective is not Objective.sft and self.resources.effective_sharding is not None:
            problems.append(f"objective {objective.value} trains on one GPU: resources.num_gpus must be 1")
        return problems

    def _reference_problems(self) -> list[str]:
        reference = self.reference
        name = self.objective.value
        adapters = self.method in (Method.lora, Method.qlora)
        if reference == "adapter_disabled" and not adapters:
            return [
                f"{name}.reference 'adapter_disabled' is the base model under disabled adapters: {self.method.value} "
                "has none; use 'precomputed' (a first pass over the dataset) or 'copy' (a frozen copy of the base)"
            ]
        if reference in ("adapter_disabled", "precomputed") and self.lora is not None and self.lora.init == "pissa":
            return [
                f"{name}.reference '{reference}' scores the base with the adapters off, which PiSSA has moved "
                "(its residual weights): use lora.init 'default'"
            ]
        if reference == "copy" and adapters:
            return [
                f"{name}.reference 'copy' keeps a second base model: {self.method.value} has the reference already "
                "(its base with the adapters off); use 'adapter_disabled' or 'precomputed'"
            ]
        return []

    def _sharding_problems(self) -> list[str]:
        """The combinations FSDP2 does not shard (the optimizer must step DTensor shards)."""
        if self.resources.effective_sharding is None:
            return []
        sharding, optimizer, problems = self.resources.effective_sharding.value, self.memory.optimizer, []
        if optimizer.value in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
            problems.append(
                f"optimizer {optimizer.value} (bitsandbytes) steps whole tensors, not FSDP2's DTensor "
                f"shards: use adamw or adamw_4bit with sharding {sharding}"
            )
        if optimizer is Optimizer.cpu_offload:
            problems.append(
                "optimizer cpu_offload does not take DTensor shards: with sharding use adamw and "
                "resources.offload 'optimizer'"
            )
        if optimizer.is_galore:
            problems.append(
                f"optimizer {optimizer.value} projects whole weight matrices; FSDP2 holds row shards: "
                "GaLore runs on one GPU only"
            )
        quantization = self.quantization_options  # set exactly when the method is qlora
        if quantization is not None and quantization.bits == 8:
            problems.append(
                "qlora with quantization.bits 8 (LLM.int8 Int8Params) does not shard: use bits 4 "
                "(FSDP-QLoRA stores NF4 codes in bnb_4bit_quant_storage = the compute dtype)"
            )
        return problems

    # The effective per-method options: the defaults when the spec leaves them out.
    @property
    def lora_options(self) -> LoraOptions | None:
        if self.method in (Method.lora, Method.qlora):
            return self.lora or LoraOptions()
        return None

    @property
    def quantization_options(self) -> QuantizationOptions | None:
        if self.method is Method.qlora:
            return self.quantization or QuantizationOptions()
        return None

    @property
    def freeze_options(self) -> FreezeOptions | None:
        if self.method is Method.freeze:
            return self.freeze or FreezeOptions()
        return None

    @property
    def dpo_options(self) -> DpoOptions | None:
        return (self.dpo or DpoOptions()) if self.objective is Objective.dpo else None

    @property
    def kto_options(self) -> KtoOptions | None:
        return (self.kto or KtoOptions()) if self.objective is Objective.kto else None

    @property
    def orpo_options(self) -> OrpoOptions | None:
        return (self.orpo or OrpoOptions()) if self.objective is Objective.orpo else None

    @property
    def reference(self) -> Reference | None:
        """dpo's and kto's reference, resolved: the adapters' own base where there are adapters, else a first
        pass over the dataset. None for objectives without one."""
        options = self.dpo_options or self.kto_options
        if options is None:
            return None
        if options.reference is not None:
            return options.reference
        return "adapter_disabled" if self.method in (Method.lora, Method.qlora) else "precomputed"

    @property
    def badam_options(self) -> BadamOptions | None:
        if self.memory.optimizer is Optimizer.badam:
            return self.badam or BadamOptions()
        return None

    @property
    def galore_options(self) -> GaloreOptions | None:
        if self.memory.optimizer.is_galore:
            return self.galore or GaloreOptions()
        return None
