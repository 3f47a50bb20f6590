"""Per-rank memory of FSDP2 (torch.distributed.fsdp.fully_shard) sharded training: one small function per term.

The facts the worker must obey to make these predictions true (say a fact once: the worker imports them):
  - GROUPS: fully_shard on model.embed_tokens, on every decoder layer, on [model.norm, lm_head] with
    reshard_after_forward=False (its backward runs first, right after the loss; torchtitan's apply_fsdp does the
    same under its default reshard policy), then on the root model. The last decoder layer may also keep
    reshard_after_forward=False (torchtitan-derived trainers do: backward would all-gather it again at once):
    the one layer the loss phases hold covers it.
  - zero3: the other groups reshard_after_forward=True; zero2: every group reshard_after_forward=False.
  - -mixed precisions: MixedPrecisionPolicy(param_dtype=bf16|fp16, reduce_dtype=fp32) instead of torch.autocast:
    all-gathers cast the fp32 shards to the half dtype, so no autocast weight copies exist.
  - offload 'params': CPUOffloadPolicy(pin_memory=True); 'optimizer': the sharded optimizer states live and
    step on the host (a pinned copy of each param and grad shard; torchao CPUOffloadOptimizer's layout).
Source of the FSDP2 behaviour: torch 2.11 torch/distributed/fsdp/_fully_shard/ (cited per term).
Every multi-GPU figure here is NOT MEASURED on hardware (docs/planner-accuracy.md, "Multi-GPU").
"""

from __future__ import annotations

from planner import terms as t
from planner.shapes import ModelShape

GIB = t.GIB
MIB = 1 << 20

# torch 2.11 _fsdp_param_group.py [Note: Overlapping all-gather copy-in and all-gather]: with the always-on
# implicit forward prefetch the current group's all-gather output stays referenced until the next group's copy-in
# is done, and in backward pre_backward(default_prefetch=True) all-gathers the next group to run while the
# current one computes: two decoder layers' unsharded params at once (docs notes/fsdp.rst "FSDP Prefetch Nuances").
PREFETCH_LAYERS = 2
# _fsdp_collectives.py foreach_reduce: the unsharded grads (grad dtype) are copied into one reduce_scatter_input
# (reduce dtype, world_size x shard = the group's unsharded numel); FSDPParamGroup keeps the previous group's
# reduce-scatter state alive while the next one is issued: two reduce-dtype buffers + one group's grads.
REDUCE_SCATTER_BUFFERS = 2
# NOT MEASURED: NCCL's communicator buffers are cudaMalloc'ed outside torch's caching allocator (NCCL_BUFFSIZE
# 4 MiB per channel and peer, up to 32 channels on NVLink, plus NVLS/CUMEM buffers): an allowance, on > 1 rank.
NCCL_BYTES = 512 * MIB

# GROUPS, as the worker's shard_model (worker/training/sharded.py) applies them: whether a group frees its
# all-gathered params after its forward, per sharding. The head group ([norm, lm_head]) never does.
HEAD_GROUP_RESHARDS_AFTER_FORWARD = False


def reshards_after_forward(sharding: str) -> bool:
    """The embeddings' and every decoder layer's group: zero3 frees them after the forward, zero2 keeps them."""
    return sharding == "zero3"


# Static terms divided across the ranks (dim-0 chunks, torch.chunk: padding of < num_gpus rows is ignored).
SHARDED_STATIC = ("weights", "master_weights", "quantization_constants", "trainable_params", "optimizer_states")
# Moved to the host by each offload mode.
HOST_TERMS = {
    "none": (),
    "optimizer": ("optimizer_states",),
    "params": (
        "weights",
        "master_weights",
        "quantization_constants",
        "trainable_params",
        "optimizer_states",
        "gradients",
    ),
}


def shard_bytes(total: int, num_gpus: int) -> int:
    """One rank's share of a sharded term."""
    return -(-total // num_gpus)


def gather_bytes(s: t.Setup, stored: int) -> int:
    """Bytes per element of an all-gathered param: MixedPrecisionPolicy's param_dtype (the half dtype) under the
    -mixed precisions, else the dtype it is stored in."""
    return 2 if s.autocast else stored


def unsharded_layer_bytes(shape: ModelShape, s: t.Setup) -> int:
    """One decoder layer's params as all-gathered: its projections (NF4 codes + constants for qlora: FSDP-QLoRA's
    bnb_4bit_quant_storage all-gathers the packed bytes as they are), norms, biases, router and experts, and its
    adapters (peft fp32, cast to param_dtype under a MixedPrecisionPolicy)."""
    trained = s.trainable_layers > 0 and not s.trained_tensors  # full, or freeze's trained layers (the largest)
    stored = s.trained_bytes if trained else s.frozen_bytes
    if s.traits.quantized:
        linears = (t.layer_linear_weight_bytes(shape, s) + t.quant_constant_bytes(shape, s)) // shape.num_layers
    else:
        linears = shape.layer_linear_numel * gather_bytes(s, stored)
    others = (shape.layer_other_numel + shape.layer_expert_numel) * gather_bytes(s, stored)
    adapters = adapter_numel_per_layer(shape, s) * gather_bytes(s, 4)
    return linears + others + adapters


def head_group_bytes(shape: ModelShape, s: t.Setup) -> int:
    """The [model.norm, lm_head] group (tied: the embedding matrix) as all-gathered; kept from forward to backward."""
    stored = s.trained_bytes if s.traits.trains_head else s.head_bytes
    return (shape.embed_numel + shape.hidden_size) * gather_bytes(s, stored)


def embed_group_bytes(shape: ModelShape, s: t.Setup) -> int:
    """model.embed_tokens as all-gathered (untied; tied it lives in the head group)."""
    if not shape.lm_head_numel:
        return 0
    stored = s.trained_bytes if s.traits.trains_head else s.head_bytes
    return shape.embed_numel * gather_bytes(s, stored)


def adapter_numel_per_layer(shape: ModelShape, s: t.Setup) -> int:
    if not s.traits.adapters:
        return 0
    return t.trainable_numel(t.trainable_tensors(shape, s)) // shape.num_layers


def trained_numel_per_group(shape: ModelShape, s: t.Setup) -> int:
    """Trainable elements of the largest group whose grads are reduce-scattered: a decoder layer, or for full
    the embedding / lm_head group."""
    if s.traits.adapters:
        return adapter_numel_per_layer(shape, s)
    if s.trained_tensors:  # freeze.trainable_modules: spread over the layers that hold them
        return s.trained_numel // max(1, s.trainable_layers)
    layer = shape.layer_numel if s.trainable_layers else 0
    return max(layer, shape.embed_numel) if s.traits.trains_head else layer


def reduce_scatter_bytes(shape: ModelShape, s: t.Setup) -> int:
    """The largest group's unsharded grads (param_dtype under mixed precision) + REDUCE_SCATTER_BUFFERS
    reduce-dtype inputs (fp32 for -mixed and fp32, the param dtype for bf16)."""
    numel = trained_numel_per_group(shape, s)
    grad = gather_bytes(s, t.trainable_param_bytes(s))
    reduce = 4 if s.autocast else t.trainable_param_bytes(s)
    return numel * (grad + REDUCE_SCATTER_BUFFERS * reduce)


def allgathered_bytes(shape: ModelShape, s: t.Setup, phase: str) -> int:
    """Unsharded params held at a phase. zero3: forward_loss and loss_backward hold the head group and one layer
    (the last layer's output until flushed, then backward's prefetch of it); layer_backward two layers (current +
    prefetched). zero2 (reshard_after_forward=False): every group stays unsharded from its forward to its backward,
    so the loss phases and early backward hold the whole model. The optimizer step holds none."""
    if phase == "optimizer_step":
        return 0
    layer, head = unsharded_layer_bytes(shape, s), head_group_bytes(shape, s)
    if s.sharding == "zero2":
        whole = shape.num_layers * layer + embed_group_bytes(shape, s)
        return whole + (head if phase != "layer_backward" else 0)
    if phase == "layer_backward":
        return PREFETCH_LAYERS * layer
    return head + layer


def nccl_bytes(s: t.Setup) -> int:
    return NCCL_BYTES if s.num_gpus > 1 else 0


def shard_phase(
    shape: ModelShape, s: t.Setup, phase: str, terms: dict[str, int]
) -> tuple[dict[str, int], dict[str, int]]:
    """One rank's terms at a phase from the single-GPU ones: (GPU terms, host terms). Activations, the loss and the
    mask are per rank as they are (each rank runs its own micro-batch)."""
    out, host = dict(terms), dict[str, int]()
    for name in SHARDED_STATIC + ("gradients",):
        if name in out:
            out[name] = shard_bytes(out[name], s.num_gpus)
    for name in HOST_TERMS[s.offload]:
        if name in out:
            host[name] = out.pop(name)
    if s.offload == "optimizer":  # the host step keeps a pinned copy of each param and grad shard
        host["host_param_copies"] = shard_bytes(t.trainable_numel(t.trainable_tensors(shape, s)), s.num_gpus) * 4
        host["host_grad_copies"] = host["host_param_copies"]
    if s.offload != "none":
        out.pop("optimizer_temporaries", None)  # the step runs on the host
    out.pop("autocast_weight_copies", None)  # MixedPrecisionPolicy all-gathers in the half dtype: nothing to cast
    out["fsdp_allgathered_params"] = allgathered_bytes(shape, s, phase)
    if phase in ("loss_backward", "layer_backward"):
        out["fsdp_reduce_scatter"] = reduce_scatter_bytes(shape, s)
    out["nccl_buffers"] = nccl_bytes(s)
    return out, host


def sharded_term_names(s: t.Setup) -> list[str]:
    """The breakdown's terms that are one rank's share of a sharded whole."""
    return [name for name in SHARDED_STATIC + ("gradients",) if name not in HOST_TERMS[s.offload]]
