"""The optimizer registry, planner side: one entry per spec Optimizer with the facts about it that do not need torch.
The worker's side of each entry (how to build, clip and checkpoint it) is worker/training/optimizers.py; a test
keeps both registries covering the enum."""

from __future__ import annotations

from dataclasses import dataclass

from domain.spec import Optimizer


@dataclass(frozen=True, slots=True)
class OptimizerTraits:
    cuda_only: str | None = None  # why a CPU worker cannot run it; None: runs on every device
    shards: bool = True  # FSDP2 can step its DTensor shards
    galore: bool = False  # keeps Adam states on low-rank projections of the layers' weights


OPTIMIZERS: dict[Optimizer, OptimizerTraits] = {
    Optimizer.adamw: OptimizerTraits(),
    Optimizer.adamw_8bit: OptimizerTraits(shards=False),  # bitsandbytes steps whole tensors
    Optimizer.paged_adamw_8bit: OptimizerTraits(shards=False),
    Optimizer.paged_adamw_32bit: OptimizerTraits(shards=False),
    Optimizer.adamw_4bit: OptimizerTraits(),
    Optimizer.cpu_offload: OptimizerTraits(
        cuda_only="torchao CPUOffloadOptimizer offloads GPU optimizer states to the host, so it needs a CUDA device",
        shards=False,
    ),
    Optimizer.galore_adamw: OptimizerTraits(shards=False, galore=True),
    Optimizer.galore_adamw_8bit: OptimizerTraits(
        cuda_only="galore-torch's GaLoreAdamW8bit synchronizes CUDA in every step", shards=False, galore=True
    ),
}
