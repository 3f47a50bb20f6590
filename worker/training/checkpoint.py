"""Training checkpoints: written every N optimizer steps, and the point a retried job resumes from.

Layout, under the job's output dir (a retry runs in the same dir, so it finds them):

    checkpoints/
      step-000010/                  complete: renamed into place only after COMPLETE was written in it
        trainable.safetensors       the parameters that train (adapters; the trained layers or whole model)
        trainable.json
        optimizer.safetensors       every tensor of optimizer.state_dict(), bitsandbytes' qmap/absmax included
        optimizer.json              the rest of the state dict, with {"__tensor__": name} where a tensor was
        trainer.safetensors/.json   LR schedule, grad scaler, RNG states, data position, counters, loss curve
        metrics.json                step, epoch, tokens seen, train loss: what the checkpoint is listed with
        adapter/                    lora/qlora: adapter_config.json + adapter_model.safetensors, from peft
        COMPLETE                    written last: the step and the fingerprint of the spec that wrote it
      .tmp-step-000020/             being written, or left by a killed process: never read, deleted later

A sharded job (worker/training/sharded.py) writes, in place of trainable.* and optimizer.*, its shards with
torch.distributed.checkpoint into sharded/ (each rank its own safetensors file, the shard offsets in the file's
safetensors metadata: HuggingFaceStorageWriter) and the optimizer's param groups as optimizer-groups.json; each
rank but 0 adds its RNG state (rng-rank00001.*; rank 0's is in trainer.*). It resumes on the same world size.

Only safetensors and JSON are written or read: nothing is pickled, so reading a checkpoint cannot run code.
Every tensor is copied to host memory before it is written, so a checkpoint costs no GPU memory; it costs host
memory for one copy of the trained parameters and the optimizer state while it is being written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from domain.spec import CHECKPOINT_ADAPTER_DIR, CHECKPOINT_METRICS_FILE, JobSpec, Optimizer
from worker.training.ranks import Ranks

MARKER = "COMPLETE"
TEMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Tags in the JSON half of a saved tree, for what JSON cannot say itself.
_TENSOR, _TUPLE, _ITEMS, _DTYPE, _SUBCLASS = "__tensor__", "__tuple__", "__items__", "__dtype__", "__subclass__"
_GALORE = "__galore_projector__"


@dataclasses.dataclass
class RunState:
    """The training loop's own counters at the end of an optimizer step: what a resumed run continues."""

    step: int = 0  # optimizer steps completed, hence windows of the data stream consumed: the data position
    tokens_seen: int = 0
    train_seconds: float = 0.0  # training time so far, so tokens/s and the ETA stay right after a resume
    loss_curve: list[dict] = dataclasses.field(default_factory=list)
    losses_since_report: list[float] = dataclasses.field(default_factory=list)


class Checkpoints:
    def __init__(self, root: Path, spec: JobSpec, steps_per_epoch: int, ranks: Ranks | None = None) -> None:
        self.root = Path(root)
        self.ranks = ranks or Ranks()
        self.every_steps = spec.training.checkpoint_every_steps
        self.every_epoch = spec.training.checkpoint_every_epoch
        self.keep = spec.training.keep_checkpoints
        self.fingerprint = spec_fingerprint(spec)
        self.steps_per_epoch = steps_per_epoch

    def due(self, step: int, total_steps: int, epoch_ended: bool = False) -> bool:
        """Every N steps, but not at the last one: the final artifacts are saved right after it. With
        checkpoint_every_epoch, also at each epoch's end and at the last step, so a finished job keeps one."""
        if self.every_epoch and (epoch_ended or step == total_steps):
            return True
        return bool(self.every_steps) and step % self.every_steps == 0 and step < total_steps

    def latest(self) -> Path | None:
        complete = self._complete()
        return complete[-1] if complete else None

    def resume(self, strategy, scheduler, stream: Iterator) -> RunState:
        """Load the latest complete checkpoint into the freshly built objects; a RunState at step 0 if none.
        Every rank of a sharded job calls it: they share the output dir, so they find the same checkpoint."""
        directory = self.latest()
        if directory is None:
            return RunState()
        marker = json.loads((directory / MARKER).read_text())
        if marker["spec_sha256"] != self.fingerprint:
            raise ValueError(f"{directory} was written by a different job spec; delete {self.root} to start over")
        strategy.load_state(directory)
        trainer = load_tree(directory, "trainer")
        scheduler.load_state_dict(trainer["scheduler"])
        strategy.load_scaler_state_dict(trainer["scaler"])
        run = RunState(**trainer["run"])
        for _ in range(run.step):
            next(stream)  # re-deals the same seeded shuffles, so the next step's window is the one that was due
        # last: nothing above may draw from the RNGs the loop goes on with (dropout: each rank its own)
        set_rng_state(trainer["rng"] if self.ranks.is_main else load_tree(directory, _rank_rng(self.ranks.rank)))
        return run

    def save(self, state: RunState, strategy, scheduler, carry: Path | None = None) -> str:
        """Write a checkpoint atomically, prune to the newest `keep`; the path relative to the output dir.
        Every rank calls it: each writes its own shards and RNG state, rank 0 the rest, the marker and the rename.
        `carry`: a file of the run the checkpoint takes along (a precomputed reference), so a resume on another
        machine, which gets the checkpoint from storage and nothing else, finds it."""
        final = self.root / f"step-{state.step:06d}"
        temp = self.root / f"{TEMP_PREFIX}{final.name}"  # one writer per output dir: each attempt has its own
        if self.ranks.is_main:
            shutil.rmtree(temp, ignore_errors=True)
            temp.mkdir(parents=True)
        self.ranks.barrier()
        strategy.save_state(temp)
        strategy.export_adapter(temp / CHECKPOINT_ADAPTER_DIR)
        if carry is not None and self.ranks.is_main:
            shutil.copy2(carry, temp / carry.name)
        if not self.ranks.is_main:
            save_tree(temp, _rank_rng(self.ranks.rank), rng_state())
        self.ranks.barrier()  # every rank's files are in place before the marker vouches for them
        if self.ranks.is_main:
            self._complete_on_main(temp, final, state, strategy, scheduler)
        return final.relative_to(self.root.parent).as_posix()

    def _complete_on_main(self, temp: Path, final: Path, state: RunState, strategy, scheduler) -> None:
        save_tree(
            temp,
            "trainer",
            {
                "run": dataclasses.asdict(state),
                "data_position": {  # for people reading it: a resume replays `run.step` windows
                    "epoch": state.step // self.steps_per_epoch,
                    "step_in_epoch": state.step % self.steps_per_epoch,
                },
                "scheduler": scheduler.state_dict(),
                "scaler": strategy.scaler_state_dict(),
                "rng": rng_state(),
            },
        )
        _write_synced(temp / CHECKPOINT_METRICS_FILE, json.dumps(self._metrics(state)) + "\n")
        _write_synced(temp / MARKER, json.dumps({"step": state.step, "spec_sha256": self.fingerprint}) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # only a leftover of an earlier attempt can be there
        temp.rename(final)
        _fsync_dir(self.root)
        self._prune()

    def _metrics(self, state: RunState) -> dict[str, float | int]:
        """What the checkpoint is listed with: the step's train loss, and where in the data it stands."""
        last = state.loss_curve[-1] if state.loss_curve else {}
        metrics = {
            "step": state.step,
            "epoch": state.step / self.steps_per_epoch,
            "tokens_seen": state.tokens_seen,
        }
        if "loss" in last:
            metrics["train_loss"] = last["loss"]
        return metrics

    def remove_all(self) -> None:
        self.ranks.barrier()  # no rank may still be reading one
        if self.ranks.is_main:
            shutil.rmtree(self.root, ignore_errors=True)

    def _complete(self) -> list[Path]:
        """Complete checkpoints, oldest first. A temp dir or a step dir without COMPLETE never counts."""
        if not self.root.is_dir():
            return []
        found = [
            (int(match[1]), path)
            for path in self.root.iterdir()
            if (match := _STEP_DIR.match(path.name)) and (path / MARKER).is_file()
        ]
        return [path for _, path in sorted(found)]

    def _prune(self) -> None:
        """Keep the newest `keep` complete checkpoints; delete the rest, including temp dirs of killed runs."""
        kept = set(self._complete()[-self.keep :])
        for path in self.root.iterdir():
            if path not in kept:
                shutil.rmtree(path, ignore_errors=True)


def _rank_rng(rank: int) -> str:
    return f"rng-rank{rank:05d}"


def export_adapter(model, target: Path) -> None:
    """adapter/ in the checkpoint: what PeftModel.from_pretrained loads onto the base, written by peft itself
    (adapter_config.json, adapter_model.safetensors). A PiSSA run is converted to a LoRA adapter of the original
    base, as its final artifact is. A full or freeze fine-tune has no adapter: its checkpoint's trained weights are
    trainable.safetensors, each under "trainable." and its parameter name."""
    if not hasattr(model, "peft_config"):
        return
    initial = getattr(model, "ftjobs_pissa_initial", None)
    if initial is None:
        model.save_pretrained(target)
    else:
        # peft converts PiSSA by loading the initial adapter beside the trained one (peft_model.py load_adapter):
        # its layers are initialised randomly before the weights are loaded, and the model is put in eval mode.
        # Both go back, so the run continues exactly as it would unsaved.
        saved_rng, was_training = rng_state(), model.training
        model.save_pretrained(target, path_initial_model_for_weight_conversion=str(initial))
        set_rng_state(saved_rng)
        model.train(was_training)
    (target / "README.md").unlink(missing_ok=True)  # peft's model card template: nothing of this job in it


# An out-of-memory recovery (planner/recovery.py) may change these, and none of them changes which rows a step
# trains on or the optimizer's state layout: its new attempt resumes the checkpoints of the old one.
_RECOVERABLE_TRAINING = {"micro_batch_size", "gradient_accumulation_steps"}
_RECOVERABLE_MEMORY = {"gradient_checkpointing", "fused_loss"}


def spec_fingerprint(spec: JobSpec) -> str:
    """What decides the training trajectory; the checkpoint cadence, the metadata, and how a step's rows are cut
    into micro-batches (only the effective batch counts: data.step_windows) do not."""
    relevant = spec.model_dump(
        mode="json",
        exclude={
            "metadata": True,
            "resources": True,
            "training": {"checkpoint_every_steps", "checkpoint_every_epoch", "keep_checkpoints"}
            | _RECOVERABLE_TRAINING,
            "memory": _RECOVERABLE_MEMORY,
        },
    )
    training = spec.training
    relevant["rows_per_step"] = training.micro_batch_size * training.gradient_accumulation_steps
    relevant["memory"]["optimizer"] = unpaged(spec.memory.optimizer).value
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def unpaged(optimizer: Optimizer) -> Optimizer:
    """bitsandbytes' paged AdamW 8-bit keeps the same state as its unpaged one, so either resumes the other."""
    return Optimizer.adamw_8bit if optimizer is Optimizer.paged_adamw_8bit else optimizer


# --- trees of tensors and plain values: tensors to safetensors, the structure to JSON ---------------------


def save_tree(directory: Path, name: str, tree: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, name)
    save_file(tensors, directory / f"{name}.safetensors")
    _fsync(directory / f"{name}.safetensors")
    _write_synced(directory / f"{name}.json", json.dumps(structure) + "\n")


def load_tree(directory: Path, name: str) -> Any:
    tensors = load_file(directory / f"{name}.safetensors")  # onto the CPU; load_state_dict moves them
    return _decode(json.loads((directory / f"{name}.json").read_text()), tensors)


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and type(value) is not torch.nn.Parameter:
        return _encode_subclass(value, tensors, path)
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors would be saved as {path!r}")
        # A copy on the host: no GPU memory, and no storage shared with another entry (safetensors refuses that).
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _encode(item, tensors, f"{path}.{key}") for key, item in value.items()}
        # Optimizer state is keyed by int parameter ids, which JSON object keys would turn into strings.
        return {_ITEMS: [[key, _encode(item, tensors, f"{path}.{key}")] for key, item in value.items()]}
    if isinstance(value, tuple):  # betas, random.getstate(): the loaders want tuples back, not lists
        return {_TUPLE: [_encode(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, tensors, f"{path}.{index}") for index, item in enumerate(value)]
    if isinstance(value, torch.dtype):
        return {_DTYPE: str(value).removeprefix("torch.")}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__name__ in ("GaLoreProjector", "CompactGaLoreProjector"):
        return _encode_galore_projector(value, tensors, path)
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path}")


def _encode_galore_projector(value: Any, tensors: dict[str, torch.Tensor], path: str) -> dict:
    """galore-torch keeps a GaLoreProjector object in each projected param's optimizer state: its settings
    and its projection matrix (None before the first step, a list of two for proj_type 'full')."""
    from worker.training.galore import SETTINGS, GaLoreProjector

    if not isinstance(value, GaLoreProjector):
        raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path}")
    settings = {key: getattr(value, key) for key in SETTINGS}
    return {_GALORE: settings, "ortho_matrix": _encode(value.ortho_matrix, tensors, f"{path}.ortho_matrix")}


def _encode_subclass(value: torch.Tensor, tensors: dict[str, torch.Tensor], path: str) -> dict:
    """A quantized optimizer state (torchao AdamW4bit's OptimState4bit): its plain inner tensors (codes, scale,
    qmap) and its constructor attributes, through the subclass's own flatten protocol."""
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if name not in _tensor_subclasses():  # never an arbitrary class: load_tree may only rebuild these
        raise TypeError(f"cannot checkpoint a {name} at {path}")
    inner_names, attributes = value.__tensor_flatten__()
    inner = {inner: _encode(getattr(value, inner), tensors, f"{path}.{inner}") for inner in inner_names}
    return {_SUBCLASS: name, "inner": inner, "attributes": _encode(list(attributes), tensors, f"{path}.attributes")}


def _tensor_subclasses() -> dict[str, type]:
    """The only classes a checkpoint may name: a fixed list, never an import path read from the file."""
    from torchao.optim.subclass_4bit import OptimState4bit  # torchao: imported only when such a state is met
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in (OptimState4bit, OptimState8bit, OptimStateFp8)}


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(item, tensors) for item in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        return tensors[value[_TENSOR]]
    if _TUPLE in value:
        return tuple(_decode(item, tensors) for item in value[_TUPLE])
    if _DTYPE in value:
        dtype = getattr(torch, value[_DTYPE])
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{value[_DTYPE]!r} is not a torch dtype")
        return dtype
    if _SUBCLASS in value:
        cls = _tensor_subclasses()[value[_SUBCLASS]]
        return cls.__tensor_unflatten__(_decode(value["inner"], tensors), _decode(value["attributes"], tensors))
    if _GALORE in value:
        from worker.training.galore import SETTINGS, CompactGaLoreProjector

        projector = CompactGaLoreProjector(**{key: value[_GALORE][key] for key in SETTINGS})
        projector.ortho_matrix = _decode(value["ortho_matrix"], tensors)
        return projector
    if _ITEMS in value:
        return {key: _decode(item, tensors) for key, item in value[_ITEMS]}
    return {key: _decode(item, tensors) for key, item in value.items()}


# --- the RNG states a resumed run continues ----------------------------------------------------------------


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:
        return state
    name, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
    state["numpy"] = [name, keys.tolist(), position, has_gauss, cached_gaussian]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        name, keys, position, has_gauss, cached_gaussian = state["numpy"]
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached_gaussian))


# --- durability: a COMPLETE marker must never be on disk before the files it vouches for ------------------


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_dir(path: Path) -> None:
    _fsync(path)  # makes the rename itself durable (Linux: a directory opens read-only)
