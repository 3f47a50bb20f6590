"""One small function per memory term. Every function returns bytes.

Sources are cited where each number comes from. Library paths are those of the calibrated stack:
torch 2.11.0, transformers 5.17.0, peft 0.21.0, bitsandbytes 0.50.2 (see docs/planner-accuracy.md).
Calibration rows are `calibration/h100-hf-trainer.jsonl`, named by their `case.name`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from domain.spec import Objective
from planner import policy
from planner.methods import MethodTraits
from planner.objectives import OBJECTIVES, ObjectiveTraits, ReferenceTraits

# trainable_numel is re-exported: fsdp.py and the tests read t.trainable_numel
from planner.optimizers import AO_OFFLOAD_MIN_SIZE, OptimizerTraits, Tensors
from planner.optimizers import trainable_numel as trainable_numel
from planner.shapes import Linear, ModelShape

# peft keeps LoRA/DoRA adapters in fp32 whatever the precision (planner/policy.py)
ADAPTER_BYTES = policy.DTYPE_BYTES[policy.ADAPTER_DTYPE]

GIB = 1 << 30
MASTER_BYTES = 4  # fp32 master copies of weights trained in a half dtype

# ---- constants, each with its source ------------------------------------------------------------------
# bitsandbytes 0.50.2 Linear4bit / Params4bit: NF4 packs two 4-bit codes per uint8 and keeps one absmax
# per block of 64 weights (functional.quantize_4bit, blocksize=64 default for Params4bit).
NF4_BLOCKSIZE = 64
# Double quantization (quantize_4bit(compress_statistics=True)) quantizes the fp32 absmax to uint8 in
# blocks of 256 with one fp32 absmax each, plus a 256-entry fp32 code table (QuantState.state2).
NF4_DQ_BLOCKSIZE = 256
NF4_DQ_CODE_BYTES = 256 * 4
# CUDA context: nvml_used - peak_reserved is exactly 794,820,608 bytes in all 15 calibration rows
# (H100, driver 580, torch 2.11.0+cu130). Paged (managed) optimizer states do not show in it: the six
# paged_adamw_8bit qlora rows have the same gap as the adamw rows.
CUDA_CONTEXT_BYTES = 794_820_608
# bitsandbytes 0.50.2 Linear8bitLt / Int8Params (LLM.int8, quantization.bits=8): int8 weight CB plus one fp32
# absmax per output row (SCB: int8_vectorwise_quant over dim=1).
INT8_ROW_SCALE_BYTES = 4


@dataclass(frozen=True, slots=True)
class Setup:
    """The numeric facts of one planned run, resolved from the spec and the recipe."""

    method: str  # qlora | lora | full | freeze: for reading only; the terms test `traits`
    traits: MethodTraits  # planner/methods.py METHODS[method]
    # micro_batch_size * grad_rows * max_seq_length: every sequence the policy's forward with grad runs, at the length
    # limit (the worst case); grad_rows is 2 for dpo/orpo (chosen and rejected in one forward), else 1
    tokens: int
    seq: int  # max_seq_length
    padded_batches: bool  # micro-batches may be right-padded: an attention mask exists when tokens > seq
    trained_bytes: int  # storage bytes of base weights that train (full; freeze's last layers)
    frozen_bytes: int  # storage bytes of base weights that do not train (worker: the precision's half dtype)
    head_bytes: int  # storage bytes of embeddings / lm_head / norms (fp32 when the stock kbit upcast runs)
    autocast: bool  # bf16-mixed / fp16-mixed run the forward under torch.autocast
    compute_bytes: int  # bytes of activations fed to matmuls/sdpa: 2 in bf16/fp16, 4 in fp32
    residual_bytes: int  # bytes of the residual stream between layers (fp32 params or upcast norms: 4)
    mlp_bytes: int  # bytes of gate/up/act outputs (fp32 when Linear4bit casts back to fp32 inputs: 4)
    autocast_fp32_params: bool  # trainable fp32 params under autocast: every matmul casts its weight
    adapted: tuple[Linear, ...]  # the projections carrying a LoRA adapter, per layer
    lora_r: int
    lora_dropout: bool
    dora: bool
    trainable_layers: int  # decoder layers whose own weights train (full: all; freeze: N; adapters: 0)
    gradient_checkpointing: bool
    fused_loss: bool
    optimizer: str
    optimizer_traits: OptimizerTraits  # planner/optimizers.py OPTIMIZERS[optimizer]
    quant_double: bool
    quant_bits: int = 4  # qlora: 4 (NF4/FP4, same storage) or 8 (LLM.int8)
    packing: bool = False  # training.packing: rows of packed examples carry a block-diagonal mask (sdpa)
    padding_free: bool = False  # training.padding_free: one row per micro-batch, varlen attention, no mask
    liger: bool = False  # memory.liger_kernels on CUDA: Liger's RMSNorm, SwiGLU/GeGLU, RoPE and fused loss
    offload_activations: bool = False  # memory.offload_activations: saved tensors wait in host memory
    offload_gradients: bool = False  # cpu_offload without accumulation: GPU grads are freed after their D2H copy
    trained_numel: int = 0  # freeze.trainable_modules: parameters that train (the rest of the model is frozen)
    first_grad_layer: int | None = None  # freeze.trainable_modules: the first layer autograd records in
    trained_tensors: tuple[tuple[int, int], ...] = ()  # freeze.trainable_modules: (numel, count) of each one
    galore_rank: int = 0  # galore optimizers: the projection rank (0: no GaLore)
    galore_proj_type: str = "std"
    num_gpus: int = 1  # ranks, one GPU each (resources.num_gpus)
    sharding: str = ""  # "zero2" | "zero3" (FSDP2, planner/fsdp.py); "": none
    offload: str = "none"  # resources.offload: none | optimizer | params
    objective_traits: ObjectiveTraits = OBJECTIVES[Objective.sft]  # planner/objectives.py OBJECTIVES[objective]
    reference_traits: ReferenceTraits | None = None  # planner/objectives.py REFERENCES[spec.reference]; None: none

    def with_tokens(self, tokens: int) -> Setup:
        """A copy at another micro-batch (dataclasses.replace is ~10x slower; auto re-plans a lot)."""
        new = object.__new__(Setup)
        for name in Setup.__slots__:
            object.__setattr__(new, name, getattr(self, name))
        object.__setattr__(new, "tokens", tokens)
        return new

    def fixed_key(self) -> tuple[object, ...]:
        """Every field but tokens: what the micro-batch-independent terms depend on."""
        return (
            self.method,
            self.traits,
            self.seq,
            self.padded_batches,
            self.trained_bytes,
            self.frozen_bytes,
            self.head_bytes,
            self.autocast,
            self.compute_bytes,
            self.residual_bytes,
            self.mlp_bytes,
            self.autocast_fp32_params,
            tuple(lin.name for lin in self.adapted),
            self.lora_r,
            self.lora_dropout,
            self.dora,
            self.trainable_layers,
            self.gradient_checkpointing,
            self.fused_loss,
            self.optimizer,
            self.optimizer_traits,
            self.quant_double,
            self.quant_bits,
            self.packing,
            self.padding_free,
            self.liger,
            self.offload_activations,
            self.offload_gradients,
            self.trained_numel,
            self.first_grad_layer,
            self.trained_tensors,
            self.galore_rank,
            self.galore_proj_type,
            self.num_gpus,
            self.sharding,
            self.offload,
            self.objective_traits,
            self.reference_traits,
        )


# ---- weights ----------------------------------------------------------------------------------------
def nf4_packed_bytes(numel: int) -> int:
    """bnb Params4bit: two NF4 codes per byte."""
    return (numel + 1) // 2


def nf4_constants_bytes(numel: int, double_quant: bool) -> int:
    """absmax per 64-block: fp32, or uint8 + one fp32 per 256 absmax + code table with double quant."""
    blocks = -(-numel // NF4_BLOCKSIZE)
    if not double_quant:
        return blocks * 4
    return blocks + -(-blocks // NF4_DQ_BLOCKSIZE) * 4 + NF4_DQ_CODE_BYTES


def layer_linear_weight_bytes(shape: ModelShape, s: Setup) -> int:
    """The seven projections of every decoder layer, as stored (NF4-packed for qlora)."""
    if s.traits.quantized and s.quant_bits == 8:  # int8: one byte per weight
        return shape.num_layers * shape.layer_linear_numel
    if s.traits.quantized:  # NF4 and FP4 pack the same: two codes per byte
        return shape.num_layers * sum(nf4_packed_bytes(lin.weight_numel) for lin in shape.linears)
    if s.trained_tensors:  # freeze.trainable_modules: everything frozen, the matched tensors in the trained dtype
        return shape.layer_linear_numel * shape.num_layers * s.frozen_bytes
    frozen = shape.num_layers - s.trainable_layers
    return shape.layer_linear_numel * (s.trainable_layers * s.trained_bytes + frozen * s.frozen_bytes)


def quant_constant_bytes(shape: ModelShape, s: Setup) -> int:
    if not s.traits.quantized:
        return 0
    if s.quant_bits == 8:  # SCB: one fp32 scale per output row
        return shape.num_layers * sum(lin.out_features * INT8_ROW_SCALE_BYTES for lin in shape.linears)
    per_layer = sum(nf4_constants_bytes(lin.weight_numel, s.quant_double) for lin in shape.linears)
    return shape.num_layers * per_layer


def expert_weight_bytes(shape: ModelShape, s: Setup) -> int:
    """MoE: every routed expert's weights of every layer (all of them, not the top-k). They are 3-D nn.Parameters,
    so qlora leaves them in the frozen half dtype (bnb replaces nn.Linear only); full and freeze's trained layers
    hold them in the trained dtype. 0 for dense models."""
    if not shape.num_experts:
        return 0
    if s.trained_tensors:  # freeze.trainable_modules: the matched tensors' extra bytes are in unquantized_weight_bytes
        return shape.layer_expert_numel * shape.num_layers * s.frozen_bytes
    frozen = shape.num_layers - s.trainable_layers
    return shape.layer_expert_numel * (s.trainable_layers * s.trained_bytes + frozen * s.frozen_bytes)


def unquantized_weight_bytes(shape: ModelShape, s: Setup) -> int:
    """Embeddings, untied lm_head, norms and biases: never quantized (bnb skips lm_head and embeddings).
    Freeze: the trained layers' norms are in the trained dtype (worker/training/methods.py _train_last_layers)."""
    head = (shape.embed_numel + shape.lm_head_numel + shape.hidden_size) * s.head_bytes
    if s.trained_tensors:  # the rest frozen; the matched tensors' extra bytes (trained - frozen dtype)
        return (
            head
            + shape.layer_other_numel * shape.num_layers * s.head_bytes
            + s.trained_numel * (s.trained_bytes - s.frozen_bytes)
        )
    frozen = shape.num_layers - s.trainable_layers
    return head + shape.layer_other_numel * (s.trainable_layers * s.trained_bytes + frozen * s.head_bytes)


# ---- trainable parameters and what the optimizer keeps -------------------------------------------------
def trainable_tensors(shape: ModelShape, s: Setup) -> Tensors:
    """(numel, count) of every trainable tensor: the optimizer keeps state per tensor."""
    if s.traits.adapters:
        out: Tensors = []
        for lin in s.adapted:
            out += [(s.lora_r * lin.in_features, shape.num_layers), (lin.out_features * s.lora_r, shape.num_layers)]
            if s.dora:  # peft DoraLinearLayer.weight: one magnitude per output feature
                out.append((lin.out_features, shape.num_layers))
        return out
    if s.trained_tensors:
        return list(s.trained_tensors)
    layer = [(lin.weight_numel, s.trainable_layers) for lin in shape.linears]
    layer += [(lin.out_features, s.trainable_layers) for lin in shape.linears if lin.bias]
    layer.append((shape.hidden_size, shape.norms_per_layer * s.trainable_layers))
    if shape.num_experts:  # MoE: the router and both 3-D expert tensors train, all experts (each keeps states)
        layer += [(shape.router_numel, s.trainable_layers)]
        layer += [(numel, s.trainable_layers) for _, numel in shape.expert_tensors]
    if not s.traits.trains_head:  # freeze: embeddings, lm_head and the final norm stay frozen
        return layer
    head = [(shape.embed_numel, 2 if shape.lm_head_numel else 1), (shape.hidden_size, 1)]
    return layer + head


def adapter_weight_bytes(tensors: Tensors, s: Setup) -> int:
    """peft keeps LoRA A/B (and DoRA magnitudes) in fp32: LoraConfig autocast_adapter_dtype=True."""
    if not s.traits.adapters:
        return 0
    return trainable_numel(tensors) * ADAPTER_BYTES


def trainable_param_bytes(s: Setup) -> int:
    """Bytes per trainable element: fp32 adapters, else the param dtype."""
    return ADAPTER_BYTES if s.traits.adapters else s.trained_bytes


def stepped_param_bytes(s: Setup) -> int:
    """Bytes per element of what the optimizer steps: a block-coordinate optimizer's fp32 masters, else the
    trainable params themselves."""
    return MASTER_BYTES if s.optimizer_traits.block_coordinate else trainable_param_bytes(s)


def gradient_bytes(tensors: Tensors, s: Setup) -> int:
    """One .grad per trainable param, in the param's dtype (autocast grads are cast back to it).
    cpu_offload with offload_gradients: a tensor's GPU grad is freed once its async copy to the host is done
    (post-accumulate-grad hook), so only the small kept tensors' grads stay, plus the largest one in flight."""
    if s.optimizer_traits.host_step and s.offload_gradients:
        kept = sum(n * c for n, c in tensors if n < AO_OFFLOAD_MIN_SIZE)
        largest = max((n for n, _ in tensors if n >= AO_OFFLOAD_MIN_SIZE), default=0)
        return (kept + largest) * trainable_param_bytes(s)
    return trainable_numel(tensors) * trainable_param_bytes(s)


def optimizer_state_bytes(tensors: Tensors, s: Setup, embed_numel_fp32: int = 0) -> tuple[int, int]:
    """(device bytes, paged bytes) of the optimizer states. Paged bytes live in CUDA unified memory:
    they show in neither torch's reserved memory nor NVML's per-process figure (calibration qlora rows).
    `embed_numel_fp32`: HF Trainer registers nn.Embedding weights for 32-bit states (trainer.py
    register_module_override) - the calibration recipe, not the worker."""
    if s.galore_rank:
        raise ValueError("GaLore states depend on the weights' shapes: use galore_state_bytes")
    return s.optimizer_traits.state_bytes(tensors, stepped_param_bytes(s), embed_numel_fp32)


def galore_state_bytes(shape: ModelShape, tensors: Tensors, s: Setup) -> int:
    """galore-torch: a trained [out, in] weight of a decoder layer keeps Adam's two states on its projected
    gradient and keeps its projection matrix (in the param dtype; the worker copies it out of the SVD's factor,
    worker/training/galore.py). Every other trained tensor (norms, biases, embeddings) keeps plain states.
    GaLoreAdamW's states are zeros_like(the projected grad), in the param dtype; GaLoreAdamW8bit's are
    bitsandbytes' 8-bit blockwise ones (the entry's state_bytes). freeze.trainable_modules gives no shapes: its
    tensors are counted unprojected (an overestimate)."""
    pb = trainable_param_bytes(s)

    def states(numel: int) -> int:
        return s.optimizer_traits.state_bytes([(numel, 1)], pb, 0)[0]

    layers = 0 if s.trained_tensors else s.trainable_layers
    projected = unprojected = 0
    for lin in shape.linears:
        state_numel, matrix_numel = galore_projection_numels(lin.out_features, lin.in_features, s)
        projected += states(state_numel) + matrix_numel * pb
        unprojected += states(lin.weight_numel)
    return sum(states(n) * c for n, c in tensors) + layers * (projected - unprojected)


def galore_projection_numels(out: int, inp: int, s: Setup) -> tuple[int, int]:
    """(projected gradient, projection matrices) elements of an [out, in] weight, by GaLoreProjector.project:
    std projects on the smaller side (states r x max, matrix r x min), reverse_std on the larger, right keeps
    Vh[:r] (r x in), left U[:, :r] (out x r), full both (states r x r). r = min(rank, out, in): the SVD has
    min(out, in) singular vectors."""
    r = min(s.galore_rank, out, inp)
    big, small = max(out, inp), min(out, inp)
    return {
        "std": (r * big, r * small),
        "reverse_std": (r * small, r * big),
        "right": (r * out, r * inp),
        "left": (r * inp, r * out),
        "full": (r * r, r * (out + inp)),
    }[s.galore_proj_type]


def galore_temp_bytes(shape: ModelShape, s: Setup) -> int:
    """The projection refresh (every update_proj_gap steps, the first included): torch.linalg.svd of the
    largest weight's gradient in fp32 (a copy unless the grad is fp32), with U, S and Vh (full_matrices=False).
    GaLoreAdamW8bit also clones the weight it updates (p.saved_data)."""
    if not s.galore_rank or not (s.trainable_layers or s.trained_tensors):
        return 0
    lin = max(shape.linears, key=lambda lin: lin.weight_numel)
    k = min(lin.in_features, lin.out_features)
    fp32_copy = lin.weight_numel * 4 if trainable_param_bytes(s) != 4 else 0  # an fp32 grad is used as it is
    svd = fp32_copy + (lin.out_features * k + k * lin.in_features + k) * 4
    saved = lin.weight_numel * trainable_param_bytes(s) if s.optimizer_traits.clones_weight else 0
    return svd + saved


def optimizer_temp_bytes(tensors: Tensors, s: Setup, foreach_adamw: bool) -> int:
    """torch AdamW foreach (HF 'adamw_torch', the calibration) allocates exp_avg_sq.sqrt() for every param
    at once (torch/optim/adam.py _multi_tensor_adam: torch._foreach_sqrt). fused=True (the worker) and
    bitsandbytes update in place."""
    if not (s.optimizer_traits.foreach_sqrt and foreach_adamw):
        return 0
    return trainable_numel(tensors) * trainable_param_bytes(s)


# ---- activations ------------------------------------------------------------------------------------
def adapter_activation_bytes_per_token(s: Setup) -> int:
    """peft lora.Linear / lora.bnb.Linear4bit forward: dropout keeps its bool mask (1 B/elem) and lora_A
    saves its input: the bf16 autocast cast (2 B/elem), or without autocast the fp32 input peft casts to the
    adapter's dtype (_cast_input_dtype, 4 B/elem) - a private copy of the input of every adapted
    projection. lora_B saves lora_A's r-wide output."""
    total = 0
    a_in = 2 if s.autocast else 4
    for lin in s.adapted:
        total += ((1 if s.lora_dropout else 0) + a_in) * lin.in_features + a_in * s.lora_r
        if s.dora:  # peft DoraLinearLayer.forward: base_result and lora_result kept for the magnitude mul;
            # with dropout the base matmul is redone on the dropped input (DoraLinearVariant.forward), whose
            # bf16 autocast copy is saved too
            total += 2 * s.compute_bytes * lin.out_features + (2 * lin.in_features if s.lora_dropout else 0)
    return total


def dora_weight_copy_bytes(shape: ModelShape, s: Setup) -> int:
    """DoRA with dropout recomputes base_result = F.linear(dropout(x), weight): the bf16 (dequantized or
    autocast-cast) weight is saved for backward - one copy of every adapted projection of a layer."""
    if not (s.dora and s.lora_dropout):
        return 0
    return 2 * sum(lin.weight_numel for lin in s.adapted)


def dora_norm_temp_bytes(shape: ModelShape, s: Setup) -> int:
    """DoraLinearLayer.get_weight_norm: lora_B @ lora_A (fp32) and weight + scaling * lora_weight, one
    projection at a time."""
    if not s.dora:
        return 0
    return 8 * max(lin.weight_numel for lin in s.adapted)


def base_activation_bytes_per_token(shape: ModelShape, s: Setup, trainable: bool) -> int:
    """What one decoder layer saves for backward, per token (transformers llama/qwen2 modeling, sdpa)."""
    h, i, c = shape.hidden_size, shape.intermediate_size, s.compute_bytes
    # RMSNorm: hidden.to(float32) is saved by pow/mul (4 B); a trainable weight also saves its other operand.
    norms = shape.norms_per_layer * (4 * h + (s.residual_bytes * h if trainable else 0))
    if s.liger:  # LigerRMSNormFunction saves its input as it is and one fp32 rstd per row (its dW needs no more)
        norms = shape.norms_per_layer * (s.residual_bytes * h + 4)
    # sdpa (flash/efficient, native GQA when there is no mask) saves q, k, v and its output. With a padding
    # mask, transformers repeats k/v to every query head (sdpa_attention.use_gqa_in_sdpa is False).
    kv = shape.q_dim if has_attention_mask(s) else shape.kv_dim
    attn = c * (2 * shape.q_dim + 2 * kv)
    # gated MLP: act_fn saves gate's output, the product saves act(gate) and up's output. Liger's SiLUMul / GELUMul
    # saves gate's and up's outputs only (it recomputes the activation in backward).
    mlp = (2 if s.liger else 3) * shape.active_mlp_width * s.mlp_bytes
    linears = 0
    if trainable:  # trainable projections save their input; autocast casts it once per projection
        shared = 3 if s.autocast_fp32_params else 1  # q/k/v read the same normed tensor
        mlp_in = 2 if s.autocast_fp32_params else 1  # gate/up too
        linears = c * ((shared + mlp_in) * h + shape.q_dim + i)
    if shape.num_experts:
        mlp += moe_activation_bytes_per_token(shape, s, trainable)
        if trainable:  # the dense MLP's inputs above belong to the experts: moe_activation_bytes_per_token
            linears = c * (
                (shared + (mlp_in if shape.shared_expert_intermediate_size else 0)) * h
                + shape.q_dim
                + shape.shared_expert_intermediate_size
            )
    return norms + attn + mlp + linears


def moe_activation_bytes_per_token(shape: ModelShape, s: Setup, trainable: bool) -> int:
    """transformers 5.17 MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock, beyond the top-k experts' gated-MLP
    tensors (active_mlp_width): the router's softmax(router_logits.float()) output [tokens, E] fp32; each of the
    top-k expert outputs is multiplied by its routing weight, which saves the output (h); with trainable experts
    F.linear saves the gathered input hidden_states[token_idx] (h) and act(gate)*up (i_e) per routed token.
    qwen2_moe: sigmoid(shared_expert_gate) x shared output saves the shared output (h). NOT MEASURED on hardware."""
    h, k, c = shape.hidden_size, shape.experts_per_token, s.compute_bytes
    total = shape.num_experts * 4 + k * h * c
    if trainable:
        total += k * (h + shape.expert_intermediate_size) * c
    if shape.shared_expert_intermediate_size:
        total += h * c
    return total


def layer_activation_bytes(shape: ModelShape, s: Setup, trainable: bool) -> int:
    """All saved tensors of one layer at `s.tokens` tokens."""
    per_token = base_activation_bytes_per_token(shape, s, trainable) + adapter_activation_bytes_per_token(s)
    return per_token * s.tokens + attention_bias_bytes(s)


def attention_mask_bytes(s: Setup) -> int:
    """A padded micro-batch gets a bool [batch, 1, seq, seq] mask (transformers masking_utils.sdpa_mask),
    built once per forward; an unpadded one none (is_causal)."""
    return s.tokens * s.seq if has_attention_mask(s) else 0


def has_attention_mask(s: Setup) -> bool:
    """Padding: a micro-batch > 1 may be right-padded. Packing (worker data.pack_examples) has no padding mask,
    but transformers masking_utils.find_packed_sequence_indices turns the position_ids restarts into a
    block-diagonal bool [batch, 1, seq, seq] mask of the same size for sdpa, at every micro-batch size (a row
    holding one example only needs none; the planner takes the worst case). Padding-free batches
    (worker/training/attention.py) build no mask at all: their examples' bounds are cu_seq_lens."""
    if s.padding_free:
        return False
    if s.packing:
        return True
    return s.padded_batches and s.tokens > s.seq


def attention_bias_bytes(s: Setup) -> int:
    """torch sdpa turns a bool mask into an additive one in the query dtype on every call, and the
    memory-efficient kernel saves it for backward: one [batch, 1, seq, seq] copy per layer."""
    return attention_mask_bytes(s) * s.compute_bytes


def checkpoint_bytes(shape: ModelShape, s: Setup) -> int:
    """Non-reentrant checkpointing keeps each checkpointed layer's input hidden states."""
    return s.tokens * shape.hidden_size * s.residual_bytes


def grad_layers(shape: ModelShape, s: Setup) -> int:
    """Layers that record autograd state: all with adapters/full, the last N with freeze."""
    if s.first_grad_layer is not None:  # freeze.trainable_modules: from the first layer holding a match
        return shape.num_layers - s.first_grad_layer
    return s.trainable_layers if s.traits.trains == "selected" else shape.num_layers


def saved_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """Everything the forward pass keeps for backward across the decoder stack, on the device."""
    return resident_grad_layers(shape, s) * saved_layer_bytes(shape, s)


def saved_layer_bytes(shape: ModelShape, s: Setup) -> int:
    """What one layer keeps for backward: its input when checkpointed, else all it saves."""
    if s.gradient_checkpointing:
        return checkpoint_bytes(shape, s)
    return layer_activation_bytes(shape, s, trainable=s.traits.trains_base)


def resident_grad_layers(shape: ModelShape, s: Setup) -> int:
    """Layers whose saved tensors are on the device at once: all that record autograd state, or with
    memory.offload_activations the one whose tensors are in flight (worker/training/offload.py: each is copied
    to the host as it is saved, and back when its backward runs)."""
    layers = grad_layers(shape, s)
    return min(layers, 1) if s.offload_activations else layers


def offloaded_activation_bytes(shape: ModelShape, s: Setup) -> int:
    """memory.offload_activations: every layer's saved tensors in host memory at the end of the forward."""
    return grad_layers(shape, s) * saved_layer_bytes(shape, s) if s.offload_activations else 0


# ---- logits and loss ---------------------------------------------------------------------------------
def logits_fp32_bytes(shape: ModelShape, s: Setup) -> int:
    """transformers loss_utils.ForCausalLMLoss: logits.float() - tokens x vocab x 4 bytes."""
    return s.tokens * shape.vocab_size * 4


def loss_backward_bytes(shape: ModelShape, s: Setup) -> int:
    """Backward of cross_entropy: log_softmax's saved output, nll's grad and log_softmax's grad input
    are all tokens x vocab fp32 at once (3x). gemma2's soft-cap keeps its tanh output too."""
    if s.fused_loss:
        return fused_loss_bytes(shape, s)
    return 3 * logits_fp32_bytes(shape, s) + softcap_bytes(shape, s)


def softcap_bytes(shape: ModelShape, s: Setup) -> int:
    """gemma2's final-logit soft-cap saves its tanh output (low precision, tokens x vocab) for backward. The
    fused loss applies no soft-cap (worker/training/loss.py)."""
    if not shape.final_logit_softcapping or s.fused_loss:
        return 0
    return s.tokens * shape.vocab_size * s.compute_bytes


def loss_forward_bytes(shape: ModelShape, s: Setup) -> int:
    """Forward of the loss: lm_head's logits (bf16 under autocast), their fp32 copy and log_softmax's out."""
    if s.fused_loss:
        return fused_loss_bytes(shape, s)
    lowp = s.tokens * shape.vocab_size * s.compute_bytes if s.compute_bytes < 4 else 0
    return lowp + 2 * logits_fp32_bytes(shape, s)


def fused_loss_bytes(shape: ModelShape, s: Setup) -> int:
    """The worker's fused loss (worker/training/loss.py _fused_loss_sum): lm_head + cross-entropy per chunk
    of policy.FUSED_CHUNK_TOKENS positions under activation checkpointing, so one chunk's logits exist at a time:
    in its backward 3 fp32 chunk x vocab buffers (as the unfused loss; the chunk's low-precision logits are
    already freed: calibration/h100-worker.jsonl). The learned positions' hidden states are gathered into one
    tokens x hidden tensor the chunks keep for their recomputation."""
    if s.liger:
        return liger_loss_bytes(shape, s)
    return 3 * loss_block_bytes(shape, s) + s.tokens * shape.hidden_size * s.compute_bytes


def liger_chunk_tokens(shape: ModelShape, s: Setup) -> int:
    """liger-kernel 0.8.5 fused_linear_cross_entropy_forward: chunks of next_power_of_2(ceil(BT / ceil(V / H)))
    positions, at most BT, so one chunk's logits are about the size of the BT x H input."""
    inc_factor = -(-shape.vocab_size // shape.hidden_size)
    chunk = 1 << max(0, (-(-s.tokens // inc_factor) - 1).bit_length())
    return min(chunk, s.tokens)


def liger_loss_bytes(shape: ModelShape, s: Setup) -> int:
    """Liger's fused linear cross-entropy computes the input's gradient in forward: the gathered learned positions
    (tokens x hidden, worker/training/loss.py), grad_input of the same size (kept for backward), a fp32 loss
    per position, and one chunk's logits in the compute dtype, which its kernel overwrites with their gradient
    in place (no fp32 copy). A trained lm_head's grad_weight is allocated here too, in forward (full)."""
    gathered = s.tokens * shape.hidden_size * s.compute_bytes
    head_grad = shape.embed_numel * s.trained_bytes if s.traits.trains_head else 0
    return 2 * gathered + s.tokens * 4 + loss_block_bytes(shape, s) + head_grad


def loss_block_bytes(shape: ModelShape, s: Setup) -> int:
    """The largest tokens x vocab block of the loss: all the logits or one chunk of the fused loss (fp32), or one
    chunk of Liger's (compute dtype)."""
    if s.liger:
        return liger_chunk_tokens(shape, s) * shape.vocab_size * s.compute_bytes
    tokens = min(policy.FUSED_CHUNK_TOKENS, s.tokens) if s.fused_loss else s.tokens
    return tokens * shape.vocab_size * 4


def lm_head_cast_bytes(shape: ModelShape, s: Setup) -> int:
    """An fp32 lm_head under bf16 autocast: F.linear casts the weight to bf16 and saves the copy for
    backward (the stock kbit upcast, or bf16-mixed full)."""
    if s.head_bytes == 4 and s.autocast:
        return shape.embed_numel * 2
    return 0


def autocast_cache_bytes(shape: ModelShape, s: Setup) -> int:
    """torch autocast caches the bf16 copy of every fp32 leaf weight that requires grad until the autocast
    region exits (end of forward): all projections of the trainable layers, plus lm_head for full."""
    if not s.autocast_fp32_params:
        return 0
    return 2 * (s.trainable_layers * shape.layer_linear_numel + (shape.embed_numel if s.traits.trains_head else 0))


def dequant_buffer_bytes(shape: ModelShape, s: Setup) -> int:
    """bnb MatMul4Bit: dequantize_4bit materialises one bf16 weight at a time (forward and backward)."""
    return shape.largest_linear_numel * 2 if s.traits.quantized else 0


# LLM.int8 (bits=8): MatMul8bitLt's backward dequantizes the int8 weight to fp16 for grad_input (CB * SCB / 127):
# the same one-weight-at-a-time bf16/fp16 buffer, so the term is shared.


# ---- preference objectives (planner/objectives.py; worker/training/objectives.py and reference.py) -------------
def example_tokens(s: Setup) -> int:
    """micro_batch_size x max_seq_length: one sequence of every example of the micro-batch (s.tokens holds
    grad_rows of them)."""
    return s.tokens // s.objective_traits.grad_rows


def no_grad_setup(s: Setup, rows: int, adapters: bool) -> Setup:
    """A forward under torch.no_grad over `rows` sequences per example, collated (and padded) as one batch: the
    reference's (reference.py _both_sequences) runs without adapters - peft's disable_adapter, or a copy or
    the precompute pass of a model that has none - and kto's mismatched rows run through the policy, adapters on."""
    if adapters:
        return s.with_tokens(example_tokens(s) * rows)
    return replace(s, tokens=example_tokens(s) * rows, adapted=(), lora_dropout=False, dora=False)


def no_grad_layer_bytes(shape: ModelShape, s: Setup) -> int:
    """One decoder layer of a no-grad forward: each intermediate is freed once the next op has read it, so no more
    than what the layer would save for backward lives at once (an upper bound, NOT MEASURED on a GPU), beside the
    bool mask the forward builds once. The layers before it left nothing behind."""
    return layer_activation_bytes(shape, s, trainable=False) + attention_mask_bytes(s)


def no_grad_logits_bytes(shape: ModelShape, s: Setup) -> int:
    """sequence_logps at the end of a no-grad forward: the same logits as the policy's loss forward (the bf16
    logits, their fp32 copy and log_softmax's output; or one chunk of the fused path with the gathered hidden
    states; Liger counted as with grad, an upper bound); only the per-sequence sums survive it."""
    return loss_forward_bytes(shape, s)


def policy_logps_saved_bytes(shape: ModelShape, s: Setup) -> int:
    """What the policy's sequence_logps keeps for its backward while the no-grad forwards after it run (Dpo.loss,
    Kto.loss: the policy's log-probabilities first): log_softmax's fp32 output over every row (cross_entropy
    with reduction none; the bf16 logits and their fp32 copy are freed once it returns) and gemma2's tanh output.
    The fused path keeps the gathered learned positions' hidden states its chunks recompute from; Liger's keeps
    those, its grad_input, the per-position losses and a trained head's grad_weight (all but its chunk)."""
    if s.liger:
        return liger_loss_bytes(shape, s) - loss_block_bytes(shape, s)
    if s.fused_loss:
        return s.tokens * shape.hidden_size * s.compute_bytes
    return logits_fp32_bytes(shape, s) + softcap_bytes(shape, s)


def copies_reference(s: Setup) -> bool:
    return s.reference_traits is not None and s.reference_traits.copies_weights


def reference_weight_bytes(shape: ModelShape, s: Setup) -> int:
    """reference 'copy' (reference.py FrozenCopy): copy.deepcopy of the loaded model holds every parameter again,
    in its own dtype (full's fp32 weights under -mixed; freeze's trained layers in fp32 beside the frozen rest).
    BAdam's fp32 masters are the optimizer's, not the model's: not copied."""
    if not copies_reference(s):
        return 0
    stored = layer_linear_weight_bytes(shape, s) + unquantized_weight_bytes(shape, s) + expert_weight_bytes(shape, s)
    return stored + quant_constant_bytes(shape, s)


def reference_cast_bytes(shape: ModelShape, s: Setup) -> int:
    """An fp32 copy under bf16 autocast: F.linear casts each of its weights to bf16 as it runs and keeps none
    (autocast caches only weights that require grad); at the logits, the lm_head's copy."""
    return lm_head_cast_bytes(shape, s) if copies_reference(s) else 0
