"""What a worker stores as a job's progress is what the API declares (service/schemas.py Progress): the training
loop's Progress report and the training process's resident memory, field for field and type for type."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from pydantic import ValidationError

from service.schemas import Progress as DeclaredProgress
from worker.job_process import _resident_memory
from worker.training.recipe import Progress


def test_declared_progress_is_the_worker_report():
    reported = typing.get_type_hints(Progress)
    resident = _resident_memory()
    assert set(resident) == {"process_resident_bytes", "process_peak_resident_bytes"}  # Linux: both are read
    declared = {name: field.annotation for name, field in DeclaredProgress.model_fields.items()}
    assert declared == {**reported, **{name: int | None for name in resident}}
    # Absent off Linux and before eval_loss existed: optional in the contract.
    required = {name for name, field in DeclaredProgress.model_fields.items() if field.is_required()}
    assert required == {f.name for f in dataclasses.fields(Progress) if f.default is dataclasses.MISSING}


def test_a_report_as_the_worker_sends_it_validates_strictly():
    report = Progress(
        step=3,
        total_steps=10,
        epoch=0.3,
        loss=1.5,
        learning_rate=2e-4,
        tokens_per_second=812.5,
        eta_seconds=4.2,
        memory_allocated_bytes=None,
        memory_reserved_bytes=None,
        memory_peak_bytes=None,
    )
    stored = {**dataclasses.asdict(report), **_resident_memory()}  # as worker/job_process.py sends it
    assert DeclaredProgress.model_validate(stored, strict=True).model_dump() == stored | {"eval_loss": None}
    with pytest.raises(ValidationError):  # a field the worker added without the contract
        DeclaredProgress.model_validate({**stored, "grad_norm": 1.0})
