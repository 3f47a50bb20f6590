"""A job's kept checkpoints, as its owner sees them: listed with their metrics, downloaded as a tar.

What a download holds (worker/training/checkpoint.py writes it):
  lora / qlora   adapter_config.json + adapter_model.safetensors, as peft saves them: extracted into a
                 directory, it loads with PeftModel.from_pretrained(base, directory)
  full / freeze  trainable.safetensors (+ trainable.json): the trained parameters, each under "trainable." and
                 its parameter name: with the prefix cut, model.load_state_dict(..., strict=False) on the
                 base loads them (for full, every weight; for freeze, the other weights are the base's)
Either way with metrics.json (step, epoch, tokens_seen, train_loss).
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from domain.spec import CHECKPOINT_ADAPTER_DIR, CHECKPOINT_METRICS_FILE, Method
from service.errors import CheckpointNotFound
from service.jobs import attempts
from service.jobs.service import load_job
from service.models import Job, JobCheckpoint
from service.settings import Settings
from service.storage import job_storage
from service.tenancy.keys import Caller

_TRAINED_WEIGHTS = ("trainable.safetensors", "trainable.json")


def list_checkpoints(session: Session, job_id: str, caller: Caller) -> tuple[Job, list[JobCheckpoint]]:
    """The job and its kept checkpoints, newest step first; a step saved by two attempts shows the newer."""
    job = load_job(session, job_id, caller.tenant_scope)
    newest: dict[int, JobCheckpoint] = {}
    for checkpoint in attempts.checkpoints_of(session, job.id):  # newest step first, then newest attempt
        newest.setdefault(checkpoint.step, checkpoint)
    return job, list(newest.values())


def find_checkpoint(session: Session, job_id: str, step: int, caller: Caller) -> tuple[str, str]:
    """The storage key of the job's checkpoint at `step`, and the job's method."""
    job, kept = list_checkpoints(session, job_id, caller)
    found = next((checkpoint for checkpoint in kept if checkpoint.step == step), None)
    if found is None:
        raise CheckpointNotFound(f"job {job.id} keeps no checkpoint of step {step}")
    return found.storage_key, job.spec["method"]


def write_tar(settings: Settings, storage_key: str, method: str) -> Path:
    """The checkpoint's downloadable part as a tar in a temporary file, which the caller deletes."""
    storage = job_storage(settings)
    if method in (Method.lora.value, Method.qlora.value):
        adapter = f"{storage_key}/{CHECKPOINT_ADAPTER_DIR}"
        members = [(name, f"{adapter}/{name}") for name, _ in storage.list_tree(adapter)]
    else:
        members = [
            (name, f"{storage_key}/{name}") for name, _ in storage.list_tree(storage_key) if name in _TRAINED_WEIGHTS
        ]
    if not members:
        raise CheckpointNotFound(f"the checkpoint at {storage_key!r} is gone from storage")
    metrics_key = f"{storage_key}/{CHECKPOINT_METRICS_FILE}"
    if storage.exists(metrics_key):
        members.append((CHECKPOINT_METRICS_FILE, metrics_key))
    handle = tempfile.NamedTemporaryFile(dir=settings.resolved_home, prefix=".checkpoint-", suffix=".tar", delete=False)
    try:
        with handle, tarfile.open(fileobj=handle, mode="w") as tar:
            for name, key in members:
                info = tarfile.TarInfo(name)
                info.size = storage.size(key)
                with storage.open_read(key) as source:
                    tar.addfile(info, source)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return Path(handle.name)
