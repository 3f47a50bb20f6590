"""FSDP2 behind the strategy seam (worker/training/strategy.py): the same calls, with the model sharded over the
ranks of a torchrun launch by torch's own `fully_shard` (torch.distributed.fsdp).

  zero3  the embeddings, every decoder layer and the root are `fully_shard` groups that free their gathered
         parameters after the forward (reshard_after_forward=True): parameters, gradients and optimizer states are
         all sharded; [norm, lm_head] keeps its own gathered, as planner/fsdp.py plans (GROUPS);
  zero2  every group keeps its gathered parameters from the forward to the backward
         (reshard_after_forward=False): gradients and states sharded, parameters whole while a step runs.

Mixed precision is FSDP2's MixedPrecisionPolicy: the shards are stored in the precision's trained dtype, gathered
in the autocast dtype, and gradients reduce-scattered in fp32, which is what planner/fsdp.py plans per rank.
Gradients are averaged over the ranks, so N ranks of micro-batch m step as one rank of micro-batch N x m
(tests/worker/test_sharded.py compares the two).

resources.offload 'params' is FSDP2's CPUOffloadPolicy: the shards, their gradients and the optimizer step live in
pinned host memory (CUDA only).

Checkpoints are sharded: torch.distributed.checkpoint writes each rank's shards of the trained parameters and of
the optimizer state as safetensors (HuggingFaceStorageWriter, save_distributed), so no rank gathers the model and
nothing is pickled; they load back on the same world size. Artifacts (the final adapter or model, a checkpoint's
adapter/) are consolidated: every rank takes part in the gather, rank 0 writes one safetensors artifact.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from domain.spec import JobSpec, Offload
from planner import fsdp as fsdp_plan
from planner import policy
from worker.training.loss import SHARDED_FUSED_LOSS, fused_loss_sum
from worker.training.methods import METHODS, decoder_layers
from worker.training.strategy import SingleDeviceStrategy

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
SHARDS_DIR, OPTIMIZER_GROUPS_FILE = "sharded", "optimizer-groups.json"


def mixed_precision(spec: JobSpec) -> MixedPrecisionPolicy:
    """Gather in the autocast dtype where the precision has one; reduce gradients in fp32 (planner/fsdp.py)."""
    rule = policy.PRECISIONS[spec.memory.precision]
    if rule.autocast_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=getattr(torch, rule.autocast_dtype), reduce_dtype=torch.float32)


def shard_model(spec: JobSpec, model: torch.nn.Module) -> torch.nn.Module:
    """fully_shard the groups planner/fsdp.py plans (its GROUPS), in place: the input embeddings, each decoder
    layer, [final norm, lm_head], then the root. A model whose lm_head shares the embedding's weight (tied) keeps
    both, and the final norm, in the root group (one parameter cannot belong to two groups); FSDP2 never reshards
    the root after its forward, so that group is the planner's head group of a tied model (the embedding matrix)."""
    sharding = spec.resources.effective_sharding
    if sharding is None:
        raise ValueError("shard_model needs resources.sharding (zero2 | zero3) or num_gpus > 1")
    options: dict = {"mp_policy": mixed_precision(spec)}
    if spec.resources.offload is Offload.params:
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    reshard = fsdp_plan.reshards_after_forward(sharding.value)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings, lm_head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    tied = lm_head.weight is embeddings.weight
    if not tied:
        fully_shard(embeddings, reshard_after_forward=reshard, **options)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard, **options)
    if not tied:
        norm = getattr(causal_lm.get_decoder(), "norm", None)
        head = [norm, lm_head] if norm is not None else [lm_head]
        fully_shard(head, reshard_after_forward=fsdp_plan.HEAD_GROUP_RESHARDS_AFTER_FORWARD, **options)
    fully_shard(model, reshard_after_forward=reshard, **options)
    # The fused loss runs the decoder and lm_head itself: as a registered forward method of the root it runs the
    # root's hooks (lazy init, the gather of what the root holds, the end-of-backward wait) as forward would.
    setattr(model, SHARDED_FUSED_LOSS, functools.partial(fused_loss_sum, model))
    register_fsdp_forward_method(model, SHARDED_FUSED_LOSS)
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

    # ---- sharded checkpoints -------------------------------------------------------------------------------------
    def _sharded_state(self) -> tuple[dict, dict]:
        """This rank's shards: {"trainable": {name: DTensor}, "optimizer": {name: {state: tensor}}}, and the
        optimizer's param groups (plain values, the same on every rank)."""
        model_state = get_model_state_dict(self.model)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer)  # initialises empty states first
        trainable = {name: model_state[name] for name in self.trained if name in model_state}
        return {"trainable": trainable, "optimizer": optimizer["state"]}, optimizer["param_groups"]

    def save_state(self, directory: Path) -> None:
        """A collective: every rank writes its own shards file under sharded/; rank 0 the param groups."""
        tensors, groups = self._sharded_state()
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(directory / SHARDS_DIR), save_distributed=True))
        if self.rank == 0:
            (directory / OPTIMIZER_GROUPS_FILE).write_text(json.dumps(groups) + "\n")

    def load_state(self, directory: Path) -> None:
        """Read each rank's shards in place into freshly built (sharded) state of the same shapes."""
        tensors, _ = self._sharded_state()
        dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(directory / SHARDS_DIR)))
        groups = json.loads((directory / OPTIMIZER_GROUPS_FILE).read_text())
        set_model_state_dict(self.model, tensors["trainable"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.model, self.optimizer, {"state": tensors["optimizer"], "param_groups": groups})

    def export_adapter(self, target: Path) -> None:
        """A checkpoint's adapter/, consolidated: every rank gathers, rank 0 writes it with peft."""
        if not hasattr(self.model, "peft_config"):
            return
        full = get_model_state_dict(self.model, options=FULL)
        if self.rank == 0:
            self.model.save_pretrained(target, state_dict=full)
            (target / "README.md").unlink(missing_ok=True)
