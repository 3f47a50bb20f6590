"""The method registry, planner side: one entry per spec Method with its capability flags. The memory terms test
these flags, never a method's name. The worker's side (load, trainable parameters, artifacts, checkpoint keys) is
worker/training/methods.py; a test keeps both registries covering the enum."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from domain.spec import JobSpec, Method
from planner.optimizers import OPTIMIZERS


@dataclass(frozen=True, slots=True)
class MethodTraits:
    adapters: bool  # LoRA/DoRA adapters train; the base is frozen
    quantized: bool  # the base's projections are stored quantized (bitsandbytes)
    trains: Literal["all", "selected", "none"]  # which of the base's own weights train
    trains_head: bool  # embeddings and lm_head train
    loads_trained_dtype: bool  # the whole model loads in the precision's trained dtype (else the frozen one)

    @property
    def trains_base(self) -> bool:
        """Some of the base model's own weights train (full, freeze): their layers save their matmul inputs."""
        return self.trains != "none"


METHODS: dict[Method, MethodTraits] = {
    Method.qlora: MethodTraits(
        adapters=True, quantized=True, trains="none", trains_head=False, loads_trained_dtype=False
    ),
    Method.lora: MethodTraits(
        adapters=True, quantized=False, trains="none", trains_head=False, loads_trained_dtype=False
    ),
    Method.full: MethodTraits(
        adapters=False, quantized=False, trains="all", trains_head=True, loads_trained_dtype=True
    ),
    Method.freeze: MethodTraits(
        adapters=False, quantized=False, trains="selected", trains_head=False, loads_trained_dtype=False
    ),
}


def method_traits(spec: JobSpec) -> MethodTraits:
    """What trains and how the model loads, for this spec: its method's entry, except under a block-coordinate
    optimizer (BAdam), which keeps the whole model in the frozen dtype with the embeddings and head frozen and
    trains the decoder layers only. The planner's setup and the worker's loading both ask here."""
    traits = METHODS[spec.method]
    if OPTIMIZERS[spec.memory.optimizer].block_coordinate:
        return replace(traits, trains_head=False, loads_trained_dtype=False)
    return traits
