"""The predicted peak GPU memory of the worker's training process (planner/plan.py wraps it in a Plan).

The peak is the largest of the phases of a training step; an SFT step has four (steady state: optimizer states exist):
  forward_loss   the loss forward: every layer's saved tensors + logits in bf16 and fp32 + log_softmax
  loss_backward  the first backward node: saved tensors + 3 x fp32 logits-sized buffers
  layer_backward the decoder stack's backward: all grads + one recomputed layer (with checkpointing)
  optimizer_step all grads + the optimizer's temporaries
Preference objectives (planner/objectives.py) add the forwards they run under no grad, each its own phase:
  mismatched_forward   kto: the policy scores its mismatched rows while its forward's saved tensors wait
  reference_forward    dpo/kto, reference adapter_disabled or copy: the reference scores both sequences, ditto
  reference_precompute dpo/kto, reference precomputed: the first pass before step 1, no optimizer state yet
Each phase's allocated bytes get the caching allocator's fragmentation on top, then the CUDA context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from domain.spec import JobSpec
from planner import fsdp, policy
from planner import terms as t
from planner.calibration import LearnedCorrection
from planner.methods import METHODS, method_traits
from planner.objectives import objective_traits
from planner.optimizers import OPTIMIZERS
from planner.scope import target_matches
from planner.shapes import Linear, ModelShape

# ---- fitted constants (calibration/h100-hf-trainer.jsonl, 15 rows; benchmarks/planner_accuracy.py) -------
# Small allocations outside the terms: cuBLAS/cuBLASLt workspaces, rotary tables, final norm, labels.
# The residual of the four-phase model on the lora/qlora rows was 0.07-0.14 GB.
MISC_BYTES = 110 * 2**20
# Caching allocator, no expandable segments: the loss's tokens x vocab blocks are carved from their own
# segments; the bf16 logits block (half an fp32 one) cannot host the next fp32 block, and blocks are not
# coalesced across segments (measured reserved - allocated: 0.65-0.9 x logits_fp32 on lora rows).
FRAG_LOGITS = 0.5
# General slack of block splitting and 2 MiB rounding, as a share of allocated bytes.
FRAG_ALLOC = 0.04
# Per-parameter blocks freed between steps (grads after zero_grad(set_to_none), optimizer temporaries,
# autocast weight copies) stay cached but are too small for logits-sized blocks (full rows).
FRAG_PARAM_POOL = 0.40
# expandable_segments:True (the worker) maps pages into one growing segment per stream. Fitted on the worker's
# own 20 H100 rows (calibration/h100-worker.jsonl; leave-one-out error in docs/planner-accuracy.md): at the loss
# phases, reserved - allocated is FRAG_ALLOC of allocated bytes plus a share of the loss's largest tokens x vocab
# fp32 block (all the logits, or one chunk of the fused loss) and of the per-parameter blocks freed between steps.
FRAG_LOSS_EXPANDABLE = 0.4
FRAG_FUSED_CHUNK_EXPANDABLE = 0.8  # the fused loss allocates and frees one chunk's blocks per chunk
FRAG_PARAM_POOL_EXPANDABLE = 0.4
# Gemma 2's final-logit soft-cap (divide, tanh, multiply) adds low-precision logits-sized blocks that are
# freed within the loss forward; fitted on one row (w-g2b-lora-gc-2k).
FRAG_SOFTCAP_EXPANDABLE = 0.8
# With gradient checkpointing the backward of one layer holds its recomputed saved tensors and the gradient
# temporaries of that layer's backward, which are freed as they are consumed: measured as this many layers.
GC_BACKWARD_LAYERS = 1.2

# Safety margin: 5% of the GPU, at least 1 GiB. The calibration's worst underestimate is below that.
MARGIN_FRACTION = 0.05
MARGIN_FLOOR_BYTES = 1 * t.GIB


@dataclass(frozen=True, slots=True)
class Recipe:
    """How the training process is built. WORKER is ftjobs' worker; HF_TRAINER reproduces the calibration
    runs (calibration/refbench.py). Internal: not part of the job spec."""

    kbit_upcast: bool = False  # peft prepare_model_for_kbit_training: fp32 embeddings/lm_head/norms (qlora)
    padded_batches: bool = True  # worker data.collate right-pads: a micro-batch > 1 may carry a mask
    foreach_adamw: bool = False  # HF "adamw_torch" = torch AdamW foreach; the worker uses fused=True
    embedding_fp32_states: bool = False  # HF Trainer: bnb 8-bit optimizers keep nn.Embedding states in fp32
    expandable_segments: bool = True  # the allocator setting the process runs with
    fused_loss_default: bool = True  # memory.fused_loss None: whether the chunked loss runs
    liger_kernels_default: bool = False  # memory.liger_kernels None: whether Liger's kernels run (CUDA)


# The worker: its allocator setting and fused-loss default are planner/policy.py's, as the worker applies them.
WORKER = Recipe(
    expandable_segments=policy.expandable_segments(policy.ALLOCATOR_CONF),
    fused_loss_default=policy.FUSED_LOSS_DEFAULT,
    liger_kernels_default=policy.LIGER_KERNELS_DEFAULT,
)
# refbench.py: random tokens of exactly `seq`, no padding -> no attention mask.
HF_TRAINER = Recipe(
    kbit_upcast=True,
    padded_batches=False,
    foreach_adamw=True,
    embedding_fp32_states=True,
    expandable_segments=False,
    fused_loss_default=False,
)


# A JSON merge-patch onto the job spec, as planner/suggest.py writes them: a section's fields, or a top-level value
# (`method`; null removes a section).
SpecPatch = dict[str, str | None | dict[str, str | bool | int | float | None]]


class Suggestion(BaseModel):
    description: str
    patch: SpecPatch = Field(description="A JSON merge-patch onto the job spec")
    peak_vram_bytes: int
    headroom_bytes: int


class Plan(BaseModel):
    peak_vram_bytes: int = Field(description="Predicted peak as NVML shows it: reserved + CUDA context")
    breakdown: dict[str, int] = Field(description="Bytes per term at the peak phase; sums to peak_vram_bytes")
    peak_phase: str
    phases: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="Bytes per term in every phase of a step (one rank's); phases[peak_phase] is the breakdown",
    )
    paged_optimizer_bytes: int = Field(0, description="Paged optimizer states in CUDA unified memory (not in peak)")
    gpu_memory_bytes: int | None
    safety_margin_bytes: int = Field(description="max(5% of the GPU, 1 GiB); 0 when no GPU is known")
    fits: bool | None = Field(description="peak + margin <= GPU; None when no GPU is known")
    headroom_bytes: int | None = Field(description="GPU - margin - peak; negative when it does not fit")
    micro_batch_size: int
    num_gpus: int = Field(1, description="Ranks, one GPU each; peak_vram_bytes and breakdown are one rank's")
    sharding: str | None = Field(None, description="zero2 | zero3 (FSDP2), or None: no sharding")
    sharded_terms: list[str] = Field(default_factory=list, description="Breakdown terms that are one rank's shard")
    host_breakdown: dict[str, int] = Field(
        default_factory=dict, description="One rank's offloaded bytes in host memory"
    )
    host_memory_bytes: int = Field(0, description="Host memory the offloaded terms need, all ranks together")
    reasons: list[str] = Field(default_factory=list)
    suggestions: list[Suggestion] = Field(default_factory=list)
    min_gpu_memory_bytes: int | None = Field(
        default=None, description="When nothing fits: the smallest GPU this spec fits on as it is (peak + margin)"
    )
    min_num_gpus: int | None = Field(
        default=None, description="When nothing fits: the fewest GPUs of this size (<= 8, zero3) the spec fits on"
    )
    assumptions: dict[str, str] = Field(
        default_factory=dict,
        description="What the figures assume of the process: the allocator setting (PYTORCH_CUDA_ALLOC_CONF) "
        "and the torch version the constants were calibrated with (calibrated_torch)",
    )
    warnings: list[str] = Field(
        default_factory=list, description="Why the prediction may not hold for this process (e.g. its allocator)"
    )
    learned_correction: LearnedCorrection | None = Field(
        None,
        description="Present when finished jobs of this recipe family on this GPU model measured more than the "
        "model computes: the breakdown's learned_correction term is the difference (planner/calibration.py)",
        exclude_if=lambda value: value is None,  # plans without one serialize exactly as before
    )


# ---- setup ------------------------------------------------------------------------------------------------
def _adapted(shape: ModelShape, targets: Any) -> tuple[Linear, ...]:
    if targets == "all-linear":  # peft all-linear: every nn.Linear but the output layer
        return shape.linears
    return tuple(lin for lin in shape.linears if any(target_matches(t, lin, shape.num_layers) for t in targets))


def _parameter_names(shape: ModelShape) -> list[tuple[str, int, int | None]]:
    """(name, numel, layer index) of every parameter as transformers' llama/qwen2 modeling names it; a tied
    lm_head is listed too (named_parameters(remove_duplicate=False)) but shares the embedding's storage."""
    out: list[tuple[str, int, int | None]] = [
        ("model.embed_tokens.weight", shape.embed_numel, None),
        ("model.norm.weight", shape.hidden_size, None),
        ("lm_head.weight", shape.embed_numel, None),
    ]
    norms = (
        ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    )[: shape.norms_per_layer]
    for i in range(shape.num_layers):
        for lin in shape.linears:
            out.append((f"model.layers.{i}.{lin.parent}.{lin.name}.weight", lin.weight_numel, i))
            if lin.bias:
                out.append((f"model.layers.{i}.{lin.parent}.{lin.name}.bias", lin.out_features, i))
        if shape.num_experts:  # transformers 5.17 MoE blocks: mlp.gate (the router) and mlp.experts' 3-D tensors
            out.append((f"model.layers.{i}.mlp.gate.weight", shape.router_numel, i))
            out += [(f"model.layers.{i}.mlp.experts.{name}", numel, i) for name, numel in shape.expert_tensors]
        out += [(f"model.layers.{i}.{norm}.weight", shape.hidden_size, i) for norm in norms]
    return out


def freeze_module_tensors(shape: ModelShape, names: list[str]) -> tuple[tuple[tuple[int, int], ...], int | None, int]:
    """freeze.trainable_modules, matched as the worker matches them (policy.module_name_matches): ((numel, count) of the
    trainable tensors, the first decoder layer holding one (0 when the embeddings train: autograd records from
    the first layer; None when none does), how many layers hold one)."""
    counts: dict[int, int] = {}
    layers: set[int] = set()
    embedding = False
    tied_seen = False
    for name, numel, layer in _parameter_names(shape):
        if not any(policy.module_name_matches(name, module) for module in names):
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            embedding = embedding or name == "model.embed_tokens.weight" or shape.tie_word_embeddings
            if shape.tie_word_embeddings:
                if tied_seen:
                    continue  # one shared tensor
                tied_seen = True
        if layer is not None:
            layers.add(layer)
        counts[numel] = counts.get(numel, 0) + 1
    first = 0 if embedding else (min(layers) if layers else None)
    return tuple(sorted(counts.items())), first, len(layers)


def _trainable_layers(spec: JobSpec, shape: ModelShape) -> int:
    """Decoder layers whose own weights train at once: all (full), BAdam's block, freeze's last N, none
    (adapters)."""
    badam = spec.badam_options
    if badam:
        return min(shape.num_layers, badam.layers_per_block)
    trains = METHODS[spec.method].trains
    if trains == "all":
        return shape.num_layers
    if trains == "selected" and spec.freeze_options:
        return min(shape.num_layers, spec.freeze_options.trainable_layers)
    return 0


def _trained_bytes(spec: JobSpec) -> int:
    """Storage bytes of the base weights that train. BAdam's block trains in the model's (frozen) dtype: its fp32
    masters are the optimizer's (terms.MASTER_BYTES)."""
    precision = policy.PRECISIONS[spec.memory.precision]
    return precision.frozen_bytes if OPTIMIZERS[spec.memory.optimizer].block_coordinate else precision.trained_bytes


def _trained_parts(spec: JobSpec, shape: ModelShape) -> tuple[int, tuple[tuple[int, int], ...], int | None]:
    """(trainable decoder layers, freeze's trained module tensors, the first layer whose input needs a grad)."""
    modules = spec.freeze_options.trainable_modules if spec.freeze_options else None
    if not modules:
        return _trainable_layers(spec, shape), (), None
    trained_tensors, first_grad_layer, trainable_layers = freeze_module_tensors(shape, modules)
    if first_grad_layer is None:  # lm_head / final norm only: no decoder layer records autograd state
        first_grad_layer = shape.num_layers
    return trainable_layers, trained_tensors, first_grad_layer


def build_setup(spec: JobSpec, shape: ModelShape, micro_batch: int, recipe: Recipe) -> t.Setup:
    """worker/training/loading.py precision plan (planner/policy.py PRECISIONS): frozen weights in the precision's
    frozen dtype, trained weights (full, freeze's last layers) in its trained dtype, autocast for -mixed."""
    traits = method_traits(spec)
    precision = policy.PRECISIONS[spec.memory.precision]
    autocast, frozen = precision.autocast, precision.frozen_bytes
    trained = _trained_bytes(spec)
    lora = spec.lora_options
    quant = spec.quantization_options
    upcast = traits.quantized and recipe.kbit_upcast
    whole = trained if traits.loads_trained_dtype else frozen  # the dtype the model loads in
    head = 4 if upcast and not traits.loads_trained_dtype else whole
    compute = policy.DTYPE_BYTES[precision.autocast_dtype] if precision.autocast_dtype else whole
    trainable_layers, trained_tensors, first_grad_layer = _trained_parts(spec, shape)
    liger = policy.liger_kernels_enabled(spec, shape.model_type, recipe.liger_kernels_default)
    fused_loss = spec.memory.fused_loss if spec.memory.fused_loss is not None else recipe.fused_loss_default
    sharding = spec.resources.effective_sharding
    objective, reference = objective_traits(spec)
    return t.Setup(
        method=spec.method.value,
        traits=traits,
        tokens=micro_batch * objective.grad_rows * spec.training.max_seq_length,
        seq=spec.training.max_seq_length,
        padded_batches=recipe.padded_batches,
        trained_bytes=trained,
        frozen_bytes=frozen,
        head_bytes=head,
        autocast=autocast,
        compute_bytes=compute,
        residual_bytes=4 if ((traits.loads_trained_dtype and trained == 4) or upcast or compute == 4) else 2,
        mlp_bytes=4 if (upcast or compute == 4) else 2,
        # sharded: FSDP2's MixedPrecisionPolicy all-gathers the half dtype, so no matmul casts a weight
        autocast_fp32_params=autocast and trained == 4 and traits.trains_base and sharding is None,
        adapted=_adapted(shape, lora.target_modules) if lora else (),
        lora_r=lora.r if lora else 0,
        lora_dropout=bool(lora and lora.dropout > 0),
        dora=bool(lora and lora.use_dora),
        trainable_layers=trainable_layers,
        gradient_checkpointing=spec.memory.gradient_checkpointing,
        fused_loss=fused_loss or liger,  # Liger's loss is fused too: its fused linear cross-entropy
        liger=liger,
        offload_activations=spec.memory.offload_activations,
        optimizer=spec.memory.optimizer.value,
        optimizer_traits=OPTIMIZERS[spec.memory.optimizer],
        galore_rank=spec.galore_options.rank if spec.galore_options else 0,
        galore_proj_type=spec.galore_options.proj_type if spec.galore_options else "std",
        quant_double=bool(quant and quant.double_quant),
        quant_bits=quant.bits if quant else 4,
        packing=spec.training.packing,
        padding_free=spec.training.padding_free,
        offload_gradients=policy.offload_gradients(spec),
        trained_numel=sum(n * c for n, c in trained_tensors),
        first_grad_layer=first_grad_layer,
        trained_tensors=trained_tensors,
        num_gpus=spec.resources.num_gpus,
        sharding=sharding.value if sharding else "",
        offload=spec.resources.offload.value,
        objective_traits=objective,
        reference_traits=reference,
    )


# ---- phases ----------------------------------------------------------------------------------------------
# In the order they run: a precomputed reference's pass before step 1, then a step's (the no-grad forwards of kto's
# mismatched rows and of a per-step reference between the policy's forward and its backward).
PHASES = (
    "reference_precompute",
    "forward_loss",
    "mismatched_forward",
    "reference_forward",
    "loss_backward",
    "layer_backward",
    "optimizer_step",
)


@dataclass(frozen=True, slots=True)
class _Fixed:
    """The terms that do not depend on the micro-batch (cached: auto and suggestions re-plan a lot)."""

    static: dict[str, int]
    paged: int
    grads: int
    head_grads: int  # lm_head / embedding grads: the first ones backward creates
    step_grads: int  # the gradients the optimizer step reads (BAdam: fp32 copies of the block's)
    optimizer_temp: int
    autocast_cache: int
    dequant: int


_FIXED_CACHE: dict[tuple[object, ...], _Fixed] = {}


def _fixed(shape: ModelShape, s: t.Setup, recipe: Recipe) -> _Fixed:
    """Cached by shape, recipe and every setup field but tokens (auto and suggestions re-plan a lot)."""
    key = (shape, recipe, s.fixed_key())
    found = _FIXED_CACHE.get(key)
    if found is None:
        if len(_FIXED_CACHE) > 1024:
            _FIXED_CACHE.clear()
        found = _FIXED_CACHE[key] = _compute_fixed(shape, s, recipe)
    return found


def _compute_fixed(shape: ModelShape, s: t.Setup, recipe: Recipe) -> _Fixed:
    """Only micro-batch-independent fields of `s` are read."""
    tensors = t.trainable_tensors(shape, s)
    embed_fp32 = shape.embed_numel if (recipe.embedding_fp32_states and s.traits.trains_head) else 0
    if s.galore_rank:
        states, paged = t.galore_state_bytes(shape, tensors, s), 0
    else:
        states, paged = t.optimizer_state_bytes(tensors, s, embed_fp32)
    weights = (
        t.layer_linear_weight_bytes(shape, s) + t.unquantized_weight_bytes(shape, s) + t.expert_weight_bytes(shape, s)
    )
    static = {"weights": weights, "quantization_constants": t.quant_constant_bytes(shape, s)}
    if t.copies_reference(s):  # the frozen copy lives beside the model for the whole run
        static["reference_weights"] = t.reference_weight_bytes(shape, s)
    if s.traits.loads_trained_dtype and s.trained_bytes == 4:  # fp32 params = bf16-sized weights + the master half
        static["weights"], static["master_weights"] = weights // 2, weights - weights // 2
    grads = t.gradient_bytes(tensors, s)
    step_grads = grads
    if s.optimizer_traits.block_coordinate:  # badam 1.4 _switch_trainable_params_single_gpu, _grad_to_hp
        static["master_weights"] = step_grads = t.trainable_numel(tensors) * t.MASTER_BYTES
    static |= {
        "trainable_params": t.adapter_weight_bytes(tensors, s),
        "optimizer_states": states,
        "misc_workspaces": MISC_BYTES,
    }
    head = (shape.embed_numel + shape.lm_head_numel) * s.trained_bytes if s.traits.trains_head else 0
    return _Fixed(
        static,
        paged,
        grads,
        head,
        step_grads,
        t.optimizer_temp_bytes(tensors, s, recipe.foreach_adamw) + t.galore_temp_bytes(shape, s),
        t.autocast_cache_bytes(shape, s),
        t.dequant_buffer_bytes(shape, s),
    )


def _phases(shape: ModelShape, s: t.Setup, recipe: Recipe) -> tuple[dict[str, dict[str, int]], int]:
    """(every phase's terms, paged bytes)."""
    return _phases_with_host(shape, s, recipe)[:2]


def _phases_with_host(
    shape: ModelShape, s: t.Setup, recipe: Recipe
) -> tuple[dict[str, dict[str, int]], int, dict[str, int]]:
    """(every phase's terms in the order they run, paged bytes, one rank's offloaded host terms)."""
    f = _fixed(shape, s, recipe)
    policy_phases, acts = _policy_phases(shape, s, f)
    no_grad = _no_grad_phases(shape, s, f, acts)
    # the setup whose logits are a phase's largest block: the loss phases', and the no-grad forwards', whose blocks get
    # the shares fitted on the loss phases (NOT MEASURED for them); then the cached per-parameter blocks
    blocks = {"forward_loss": s, "loss_backward": s} | {name: block for name, (_, block) in no_grad.items()}
    pool = f.grads + f.optimizer_temp + f.autocast_cache
    # before step 1 no gradient or optimizer temporary has been freed: only the autocast copies cycle
    pools = {"reference_precompute": f.autocast_cache}
    every = policy_phases | {name: terms for name, (terms, _) in no_grad.items()}
    phases = {name: every[name] for name in PHASES if name in every}
    host: dict[str, int] = {}
    if s.offload_activations:
        host["offloaded_activations"] = t.offloaded_activation_bytes(shape, s)
    if s.sharding:  # one rank's share (planner/fsdp.py); the host terms of every phase, each at its largest
        pool = fsdp.shard_bytes(f.grads, s.num_gpus) + (f.optimizer_temp if s.offload == "none" else 0)
        for name in phases:
            phases[name], moved = fsdp.shard_phase(shape, s, name, phases[name])
            host |= {k: max(v, host.get(k, 0)) for k, v in moved.items()}
    for name, terms in phases.items():
        allocated = sum(terms.values())
        terms["allocator_fragmentation"] = _fragmentation(
            shape, recipe, allocated, pools.get(name, pool), blocks.get(name)
        )
        terms["cuda_context"] = t.CUDA_CONTEXT_BYTES
    return phases, f.paged, host


def _policy_phases(shape: ModelShape, s: t.Setup, f: _Fixed) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(the four phases of the policy's step, what its forward saves for backward)."""
    static = f.static
    saved = t.saved_activation_bytes(shape, s)
    layer = t.layer_activation_bytes(shape, s, trainable=s.traits.trains_base)
    dropout_copies = t.adapter_activation_bytes_per_token(s) * s.tokens * t.resident_grad_layers(shape, s)
    lm_cast = t.lm_head_cast_bytes(shape, s)
    acts = (
        {"activations": saved}
        if s.gradient_checkpointing
        else {"activations": saved - dropout_copies, "lora_dropout_copies": dropout_copies}
    )
    acts["attention_mask"] = t.attention_mask_bytes(s)
    dora_layer = t.dora_weight_copy_bytes(shape, s)  # per layer; all layers' copies live without checkpointing
    if dora_layer and not s.gradient_checkpointing:
        acts["dora_weight_copies"] = dora_layer * t.resident_grad_layers(shape, s)
    if s.gradient_checkpointing:
        # all grads + the layer inputs + one recomputed layer and its backward temporaries (x2)
        backward = {"gradients": f.grads, "activations": saved + int(GC_BACKWARD_LAYERS * layer)}
    elif saved + f.head_grads >= f.grads:
        # early in backward: every saved tensor + the head's grads + one layer's temporaries
        backward = {"gradients": f.head_grads} | acts
        backward["activations"] += layer
    else:  # late in backward: all grads (full fine-tuning of a big model) + one layer's tensors
        backward = {"gradients": f.grads, "activations": 2 * layer}
    phases = {
        "forward_loss": static
        | acts
        | {"autocast_weight_copies": max(lm_cast, f.autocast_cache), "logits_loss": t.loss_forward_bytes(shape, s)},
        "loss_backward": static
        | acts
        | {"autocast_weight_copies": lm_cast, "logits_loss": t.loss_backward_bytes(shape, s)},
        "layer_backward": static
        | backward
        | {
            "dequant_buffers": f.dequant + t.dora_norm_temp_bytes(shape, s),
            "dora_weight_copies": backward.get("dora_weight_copies", 0) + dora_layer,
        },
        "optimizer_step": static | {"gradients": f.step_grads, "optimizer_temporaries": f.optimizer_temp},
    }
    return phases, acts


def _no_grad_phases(
    shape: ModelShape, s: t.Setup, f: _Fixed, acts: dict[str, int]
) -> dict[str, tuple[dict[str, int], t.Setup]]:
    """The forwards a preference objective runs under torch.no_grad (planner/objectives.py), each a phase of its own:
    (its terms, the setup of the forward whose logits are its largest block). kto's mismatched rows and a per-step
    reference run after the policy's forward, before its backward (worker/training/objectives.py Dpo.loss,
    Kto.loss), inside the same autocast region: the policy's saved tensors and autocast copies wait through them.
    A precomputed reference runs once before step 1, on the bare model: no optimizer state exists yet."""
    o, ref = s.objective_traits, s.reference_traits
    copies = {"autocast_weight_copies": max(t.lm_head_cast_bytes(shape, s), f.autocast_cache)}
    waiting = f.static | acts | copies | {"policy_logps_saved": t.policy_logps_saved_bytes(shape, s)}
    out: dict[str, tuple[dict[str, int], t.Setup]] = {}
    if o.no_grad_rows:
        mismatched = t.no_grad_setup(s, o.no_grad_rows, adapters=True)
        out["mismatched_forward"] = (waiting | _no_grad_terms(shape, mismatched, "mismatched"), mismatched)
    if ref is None:
        return out
    reference = t.no_grad_setup(s, o.reference_rows, adapters=False)
    if ref.per_step:
        terms = waiting | _no_grad_terms(shape, reference, "reference")
        out["reference_forward"] = (
            terms | {"reference_autocast_weight_copies": t.reference_cast_bytes(shape, s)},
            reference,
        )
    if ref.precomputes:
        bare = {name: v for name, v in f.static.items() if name != "optimizer_states"}  # allocated by step 1
        out["reference_precompute"] = (bare | copies | _no_grad_terms(shape, reference, "reference"), reference)
    return out


def _no_grad_terms(shape: ModelShape, ng: t.Setup, label: str) -> dict[str, int]:
    """A no-grad forward's own terms: one layer's working set (with qlora's one dequantized weight) and its logits."""
    return {
        f"{label}_layer_working_set": t.no_grad_layer_bytes(shape, ng),
        f"{label}_logits": t.no_grad_logits_bytes(shape, ng),
        "dequant_buffers": t.dequant_buffer_bytes(shape, ng),
    }


def _fragmentation(shape: ModelShape, recipe: Recipe, allocated: int, pool: int, block: t.Setup | None) -> int:
    """Reserved - allocated of the caching allocator at a phase (fitted; see the constants above). `block`: the
    setup of the forward whose tokens x vocab logits blocks the phase holds (the loss phases, the no-grad
    forwards); None for the others."""
    frag = FRAG_ALLOC * allocated
    if block is None:
        return int(frag)
    if not recipe.expandable_segments:
        logits = 0 if block.fused_loss else t.logits_fp32_bytes(shape, block)
        return int(frag + FRAG_LOGITS * logits + FRAG_PARAM_POOL * pool)
    block_share = FRAG_FUSED_CHUNK_EXPANDABLE if block.fused_loss else FRAG_LOSS_EXPANDABLE
    frag += block_share * t.loss_block_bytes(shape, block) + FRAG_SOFTCAP_EXPANDABLE * t.softcap_bytes(shape, block)
    return int(frag + FRAG_PARAM_POOL_EXPANDABLE * pool)


# ---- public entry point -------------------------------------------------------------------------------------
def estimate(
    spec: JobSpec, shape: ModelShape, micro_batch: int, recipe: Recipe = WORKER
) -> tuple[str, dict[str, int], int]:
    """(peak phase, its breakdown, paged bytes) for a fixed micro-batch (one rank's, when sharded)."""
    return _estimate(shape, build_setup(spec, shape, micro_batch, recipe), recipe)[:3]


def _estimate(
    shape: ModelShape, s: t.Setup, recipe: Recipe
) -> tuple[str, dict[str, int], int, dict[str, int], dict[str, dict[str, int]]]:
    """(peak phase, its breakdown, paged bytes, host terms, every phase's non-zero terms)."""
    phases, paged, host = _phases_with_host(shape, s, recipe)
    every = {phase: {k: int(v) for k, v in terms.items() if v} for phase, terms in phases.items()}
    name = max(phases, key=lambda n: sum(phases[n].values()))
    return name, every[name], paged, {k: int(v) for k, v in host.items() if v}, every


def _peak(shape: ModelShape, s: t.Setup, recipe: Recipe) -> int:
    return max(sum(terms.values()) for terms in _phases(shape, s, recipe)[0].values())


def safety_margin(gpu_memory_bytes: int) -> int:
    return max(int(MARGIN_FRACTION * gpu_memory_bytes), MARGIN_FLOOR_BYTES)


def _auto_micro_batch(shape: ModelShape, s1: t.Setup, budget: int | None, recipe: Recipe) -> int:
    """Largest micro-batch whose peak fits the budget; 1 with no GPU known (nothing to size against).
    Memory grows with the micro-batch: double until it stops fitting, then bisect. `s1`: the setup at 1."""

    if budget is None:
        return 1
    limit = budget

    def fits(mb: int) -> bool:
        return _peak(shape, s1.with_tokens(s1.tokens * mb), recipe) <= limit

    if not fits(1):
        return 1
    lo = 1
    while lo < 4096 and fits(min(2 * lo, 4096)):
        lo = min(2 * lo, 4096)
    hi = min(2 * lo, 4096) - 1 if lo < 4096 else 4096
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


@dataclass(frozen=True, slots=True)
class Outcome:
    """plan()'s numbers without the pydantic wrapper (suggestions evaluate many of these)."""

    micro_batch: int
    phase: str
    breakdown: dict[str, int]
    paged: int
    peak: int
    gpu: int | None
    margin: int
    host: dict[str, int] | None = None  # one rank's host-memory terms (offload); None: nothing offloaded
    num_gpus: int = 1
    phases: dict[str, dict[str, int]] | None = None  # every phase's terms; breakdown is the peak phase's

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.peak + self.margin <= self.gpu

    @property
    def headroom(self) -> int | None:
        return None if self.gpu is None else self.gpu - self.margin - self.peak


def evaluate(spec: JobSpec, shape: ModelShape, gpu_memory_bytes: int | None, recipe: Recipe = WORKER) -> Outcome:
    if gpu_memory_bytes is None and spec.resources.gpu_memory_gib:
        gpu_memory_bytes = int(spec.resources.gpu_memory_gib * t.GIB)
    margin = safety_margin(gpu_memory_bytes) if gpu_memory_bytes else 0
    mb = spec.training.micro_batch_size
    if mb == "auto":
        s1 = build_setup(spec, shape, 1, recipe)
        mb = _auto_micro_batch(shape, s1, gpu_memory_bytes - margin if gpu_memory_bytes else None, recipe)
        s = s1.with_tokens(s1.tokens * mb)
    else:
        s = build_setup(spec, shape, mb, recipe)
    phase, breakdown, paged, host, phases = _estimate(shape, s, recipe)
    peak = sum(breakdown.values())
    return Outcome(mb, phase, breakdown, paged, peak, gpu_memory_bytes, margin, host or None, s.num_gpus, phases)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge-patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def apply_patch(spec: JobSpec, patch: dict[str, Any]) -> JobSpec:
    return JobSpec.model_validate(merge_patch(json.loads(spec.model_dump_json()), patch))


__all__ = ["HF_TRAINER", "WORKER", "Plan", "Recipe", "Suggestion", "apply_patch", "estimate", "evaluate"]
