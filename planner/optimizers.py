"""The optimizer registry, planner side: one entry per spec Optimizer with the facts about it that do not need torch:
what its states and step cost in memory, where it runs, whether FSDP2 can step it, and which cheaper optimizers
planner/suggest.py offers in its place. The worker's side of each entry (how to
build, clip and checkpoint it) is worker/training/optimizers.py; a test keeps both registries covering the enum."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from domain.spec import Optimizer

# (numel, count) of every trainable tensor of one kind: the optimizer keeps state per tensor
Tensors = list[tuple[int, int]]

# bitsandbytes optim/optimizer.py Optimizer2State.init_state: 8-bit states use blocksize 256 with an fp32
# absmax per block, and params with numel < min_8bit_size (4096) keep fp32 states.
BNB_8BIT_BLOCKSIZE = 256
BNB_MIN_8BIT_SIZE = 4096
# bitsandbytes optim/optimizer.py Optimizer8bit.get_state_buffer: paged optimizers page only buffers with
# numel >= 1e5 (F.get_paged = cudaMallocManaged); smaller ones are ordinary torch tensors.
BNB_PAGED_MIN_NUMEL = 100_000
# torchao 0.18 optim/adam.py _AdamBase._new_buffer: states of tensors with numel >= 4096 and numel % block_size
# == 0 are OptimState4bit (subclass_4bit.py: uint8 codes packing two 4-bit codes, one fp32 scale per block of
# block_size=128, a 16-entry fp32 qmap); other tensors get zeros_like(param).
AO_4BIT_BLOCKSIZE = 128
AO_MIN_QUANT_SIZE = 4096
AO_QMAP_BYTES = 16 * 4
# torchao 0.18 optim/cpu_offload.py CPUOffloadOptimizer(minimal_size=4096): smaller tensors stay on the GPU with a
# GPU optimizer; larger ones get a pinned host copy + host grad, and their AdamW states live on the host.
AO_OFFLOAD_MIN_SIZE = 4096

# (trainable tensors, bytes per trainable element, the numel whose states HF Trainer keeps in fp32) ->
# (device bytes, paged bytes) of the optimizer's states
StateBytes = Callable[[Tensors, int, int], tuple[int, int]]


@dataclass(frozen=True, slots=True)
class OptimizerTraits:
    # GaLore entries: the states of one unprojected tensor (terms.galore_state_bytes projects the layers' weights)
    state_bytes: StateBytes
    cuda_only: str | None = None  # why a CPU worker cannot run it; None: runs on every device
    shards: bool = True  # FSDP2 can step its DTensor shards
    galore: bool = False  # keeps Adam states on low-rank projections of the layers' weights
    foreach_sqrt: bool = False  # torch AdamW: its foreach step (HF's adamw_torch) allocates exp_avg_sq.sqrt()
    host_step: bool = False  # the step and most states run on the host: GPU grads go to it (policy.offload_gradients)
    clones_weight: bool = False  # GaLoreAdamW8bit keeps a copy of the weight it updates (p.saved_data)
    # BAdam: the model stays in the precision's frozen dtype with its embeddings and head frozen; one block of
    # decoder layers at a time trains, from fp32 master copies with fp32 gradients and fp32 Adam states.
    block_coordinate: bool = False
    alternatives: tuple[Optimizer, ...] = ()  # cheaper in memory, offered by planner/suggest.py in this order


def ao_4bit_state_bytes(numel: int, param_bytes: int) -> int:
    """One torchao AdamW4bit state of one tensor: packed 4-bit codes + fp32 scale per 128 + qmap, or a
    zeros_like(param) for small / non-multiple-of-128 tensors."""
    if numel >= AO_MIN_QUANT_SIZE and numel % AO_4BIT_BLOCKSIZE == 0:
        return numel // 2 + numel // AO_4BIT_BLOCKSIZE * 4 + AO_QMAP_BYTES
    return numel * param_bytes


def adamw_state_bytes(tensors: Tensors, param_bytes: int, embed_numel_fp32: int = 0) -> tuple[int, int]:
    """torch AdamW: exp_avg, exp_avg_sq = zeros_like(param)."""
    return trainable_numel(tensors) * 2 * param_bytes, 0


def ao_4bit_adamw_state_bytes(tensors: Tensors, param_bytes: int, embed_numel_fp32: int = 0) -> tuple[int, int]:
    """torchao AdamW4bit: exp_avg and exp_avg_sq, each 4-bit."""
    return sum(2 * ao_4bit_state_bytes(n, param_bytes) * c for n, c in tensors), 0


def cpu_offload_state_bytes(tensors: Tensors, param_bytes: int, embed_numel_fp32: int = 0) -> tuple[int, int]:
    """torchao CPUOffloadOptimizer: only the tensors below minimal_size keep GPU states (torch AdamW)."""
    return sum(n * c for n, c in tensors if n < AO_OFFLOAD_MIN_SIZE) * 2 * param_bytes, 0


def bnb_state_bytes(
    tensors: Tensors, param_bytes: int, embed_numel_fp32: int = 0, *, eight_bit: bool, paged: bool
) -> tuple[int, int]:
    """bitsandbytes Optimizer2State: 8-bit blockwise states (fp32 below min_8bit_size and for the embedding HF
    Trainer overrides), or 32-bit ones; a paged optimizer pages the buffers of numel >= BNB_PAGED_MIN_NUMEL."""
    device = paged_bytes = 0
    for numel, count in tensors:
        fp32 = not eight_bit or numel < BNB_MIN_8BIT_SIZE or numel == embed_numel_fp32
        size = numel * 8 if fp32 else 2 * numel + 2 * -(-numel // BNB_8BIT_BLOCKSIZE) * 4
        if paged and numel >= BNB_PAGED_MIN_NUMEL:
            paged_bytes += size * count
        else:
            device += size * count
    return device, paged_bytes


def trainable_numel(tensors: Tensors) -> int:
    return sum(n * c for n, c in tensors)


_BNB_8BIT = partial(bnb_state_bytes, eight_bit=True, paged=False)
_GALORE = Optimizer.galore_adamw

OPTIMIZERS: dict[Optimizer, OptimizerTraits] = {
    Optimizer.adamw: OptimizerTraits(
        adamw_state_bytes,
        foreach_sqrt=True,
        alternatives=(Optimizer.adamw_8bit, Optimizer.paged_adamw_8bit, _GALORE, Optimizer.badam),
    ),
    Optimizer.adamw_8bit: OptimizerTraits(  # bitsandbytes steps whole tensors
        _BNB_8BIT, shards=False, alternatives=(Optimizer.paged_adamw_8bit, _GALORE)
    ),
    Optimizer.paged_adamw_8bit: OptimizerTraits(
        partial(bnb_state_bytes, eight_bit=True, paged=True), shards=False, alternatives=(_GALORE,)
    ),
    Optimizer.paged_adamw_32bit: OptimizerTraits(
        partial(bnb_state_bytes, eight_bit=False, paged=True),
        shards=False,
        alternatives=(Optimizer.adamw_8bit, Optimizer.paged_adamw_8bit, _GALORE),
    ),
    Optimizer.adamw_4bit: OptimizerTraits(
        ao_4bit_adamw_state_bytes, alternatives=(Optimizer.paged_adamw_8bit, _GALORE)
    ),
    Optimizer.cpu_offload: OptimizerTraits(
        cpu_offload_state_bytes,
        cuda_only="torchao CPUOffloadOptimizer offloads GPU optimizer states to the host, so it needs a CUDA device",
        shards=False,
        host_step=True,
        alternatives=(Optimizer.paged_adamw_8bit, _GALORE),
    ),
    Optimizer.galore_adamw: OptimizerTraits(
        adamw_state_bytes,
        shards=False,
        galore=True,
        alternatives=(Optimizer.galore_adamw_8bit, Optimizer.paged_adamw_8bit),
    ),
    Optimizer.galore_adamw_8bit: OptimizerTraits(
        _BNB_8BIT,
        cuda_only="galore-torch's GaLoreAdamW8bit synchronizes CUDA in every step",
        shards=False,
        galore=True,
        clones_weight=True,
        alternatives=(Optimizer.paged_adamw_8bit,),
    ),
    # badam 1.4 BlockOptimizer around torch AdamW: the base optimizer steps the active block's fp32 copies.
    Optimizer.badam: OptimizerTraits(adamw_state_bytes, shards=False, block_coordinate=True),
}
