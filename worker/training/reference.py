"""The reference policy of dpo and kto (spec.reference): the summed completion log-probabilities of both sequences
of every example, as the model stood before training. Three ways to get them:

  adapter_disabled  lora/qlora: the same model with its adapters off (peft's disable_adapter), no second copy;
                    one more forward per micro-batch, under no grad, so none of its activations are kept
  precomputed       a first pass over the training and held-out examples before step 1, as its own phase;
                    stored as output_dir/reference-logps.safetensors (written atomically, keyed by a fingerprint of
                    the tokenized examples), carried in every checkpoint, and read back, not recomputed, when the
                    job resumes (from output_dir, or from the checkpoint a resume on another machine downloads)
  copy              full/freeze: a frozen copy of the loaded model (its weights' memory again)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.training import data
from worker.training.loss import sequence_logps

REFERENCE_FILE = "reference-logps.safetensors"


@dataclass(frozen=True)
class ReferenceInfo:
    """What summary.json says of the reference: which one, and for precomputed whether this attempt computed it."""

    kind: str
    computed: bool | None = None
    seconds: float | None = None


def _both_sequences(model, collate, rows, fused: bool) -> torch.Tensor:
    sums, _ = sequence_logps(model, collate(data.first_rows(rows) + data.second_rows(rows)), fused=fused)
    return sums.view(2, len(rows))


class AdapterDisabled:
    def __init__(self, fused: bool):
        self.fused = fused

    @torch.no_grad()
    def logps(self, model, collate, rows) -> torch.Tensor:
        """Dropout off, as the copy and the precomputed pass score: the three references are the same numbers."""
        was_training = model.training
        model.eval()
        try:
            with model.disable_adapter():
                return _both_sequences(model, collate, rows, self.fused)
        finally:
            model.train(was_training)


class FrozenCopy:
    def __init__(self, model, fused: bool):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.fused = fused

    @torch.no_grad()
    def logps(self, model, collate, rows) -> torch.Tensor:
        return _both_sequences(self.model, collate, rows, self.fused)


class Precomputed:
    def __init__(self, table: torch.Tensor):
        self.table = table  # [examples, 2] float32 on the CPU, row = example.index

    def logps(self, model, collate, rows) -> torch.Tensor:
        index = torch.tensor([example.index for example in rows])
        return self.table[index].T.to(next(model.parameters()).device)


def build_reference(kind: str | None, model, fused: bool, precomputed: Precomputed | None = None):
    if kind == "adapter_disabled":
        return AdapterDisabled(fused)
    if kind == "copy":
        return FrozenCopy(model, fused)
    return precomputed


def load_or_precompute(
    path: Path, model, examples: list, *, micro_batch_size: int, collate, autocast, fused: bool
) -> tuple[Precomputed, ReferenceInfo]:
    """The stored table when its fingerprint matches these examples, else a first pass (adapters off, dropout off)
    that writes it."""
    fingerprint = _fingerprint(examples)
    stored = _stored_table(path, fingerprint)
    if stored is not None:
        return Precomputed(stored), ReferenceInfo("precomputed", computed=False)
    started = time.perf_counter()
    table = torch.zeros(max(example.index for example in examples) + 1, 2)
    was_training = model.training
    model.eval()
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        with torch.no_grad(), adapters_off:
            for start in range(0, len(examples), micro_batch_size):
                rows = examples[start : start + micro_batch_size]
                with autocast:
                    sums = _both_sequences(model, collate, rows, fused)
                table[[example.index for example in rows]] = sums.T.float().cpu()
    finally:
        model.train(was_training)
    _write_table(path, table, fingerprint)
    return Precomputed(table), ReferenceInfo("precomputed", computed=True, seconds=time.perf_counter() - started)


def _stored_table(path: Path, fingerprint: str) -> torch.Tensor | None:
    """The table of these examples from output_dir, else from the newest checkpoint that carries one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for stored_path in [path, *sorted(path.parent.glob(f"checkpoints/*/{path.name}"), reverse=True)]:
        if not stored_path.is_file():
            continue
        with safe_open(str(stored_path), "pt") as stored:
            if stored.metadata().get("fingerprint") != fingerprint:
                continue
        table = load_file(str(stored_path))["logps"]
        if stored_path != path:
            _write_table(path, table, fingerprint)
        return table
    return None


def _write_table(path: Path, table: torch.Tensor, fingerprint: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({"logps": table}, str(partial), metadata={"fingerprint": fingerprint})
    os.replace(partial, path)  # a kill mid-write leaves no table that looks complete


def _fingerprint(examples: list) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(str(example.index).encode())
        for sequence in example.sequences:
            digest.update(torch.tensor(sequence.input_ids, dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(sequence.labels, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()
