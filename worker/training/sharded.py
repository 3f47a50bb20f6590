"""FSDP2 behind the strategy seam (worker/training/strategy.py): the same calls, with the model sharded over the
ranks of a torchrun launch by torch's own `fully_shard` (torch.distributed.fsdp).

  zero3  every decoder layer, then the root, is a `fully_shard` unit that frees its gathered parameters after
         the forward (reshard_after_forward=True): parameters, gradients and optimizer states are all sharded;
  zero2  the same units keep their gathered parameters from the forward to the backward
         (reshard_after_forward=False): gradients and states sharded, parameters whole while a step runs.

Mixed precision is FSDP2's MixedPrecisionPolicy: the shards are stored in the precision's trained dtype, gathered
in the autocast dtype, and gradients reduce-scattered in fp32, which is what planner/fsdp.py plans per rank.
Gradients are averaged over the ranks, so N ranks of micro-batch m step as one rank of micro-batch N x m
(tests/worker/test_sharded.py compares the two).

What is not here yet (issue 14): the recipe's rank-aware data split, torch.distributed.checkpoint shards and the
worker's torchrun launch; state dicts below are the consolidated (full) ones, gathered on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from domain.spec import JobSpec, Sharding
from planner import policy
from worker.training.methods import METHODS, decoder_layers
from worker.training.strategy import SingleDeviceStrategy

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def mixed_precision(spec: JobSpec) -> MixedPrecisionPolicy:
    """Gather in the autocast dtype where the precision has one; reduce gradients in fp32 (planner/fsdp.py)."""
    rule = policy.PRECISIONS[spec.memory.precision]
    if rule.autocast_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, rule.autocast_dtype), reduce_dtype=torch.float32)


def shard_model(spec: JobSpec, model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head); in place."""
    sharding = spec.resources.effective_sharding
    if sharding is None:
        raise ValueError("shard_model needs resources.sharding (zero2 | zero3) or num_gpus > 1")
    options = {"reshard_after_forward": sharding is Sharding.zero3, "mp_policy": mixed_precision(spec)}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


class ShardedStrategy(SingleDeviceStrategy):
    """A model already sharded by shard_model, an optimizer built over its DTensor shards. backward, step,
    clipping (torch's clip_grad_norm_ reduces DTensor norms over the ranks) and zero_grad are the single-device
    ones; what differs is gathering state."""

    def __init__(self, spec: JobSpec, model, optimizer, scaler: torch.amp.GradScaler | None) -> None:
        if scaler is not None:
            raise ValueError("fp16 loss scaling is not sharded here: use bf16-mixed with FSDP2")
        super().__init__(spec, model, optimizer, scaler)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trained parameter whole, on rank 0's host; an empty dict on the other ranks (a collective: every
        rank calls it; cpu_offload gathers onto rank 0 only, so no rank holds more than its shard on its GPU)."""
        full = get_model_state_dict(self.model, options=FULL)
        return {name: full[name] for name in self.trained if name in full}

    def load_trainable_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        if saved.keys() != self.trained.keys():
            raise ValueError("the checkpoint's trained parameters do not match the model's")
        set_model_state_dict(self.model, saved, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL)

    def save_artifacts(self, plan, output_dir: Path) -> list[str]:
        """The method's artifacts as one consolidated safetensors file, written by rank 0 (the others gather with
        it and write nothing: they return [])."""
        full = get_model_state_dict(self.model, options=FULL)

        def save_consolidated(saveable, directory: Path, name: str) -> list[str]:
            saveable.save_pretrained(directory / name, state_dict=full)
            return [p.relative_to(directory).as_posix() for p in sorted((directory / name).rglob("*")) if p.is_file()]

        if self.rank != 0:
            return []
        return METHODS[self.spec.method].save_artifacts(self.spec, self.model, plan, output_dir, save_consolidated)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=StateDictOptions(full_state_dict=True))
