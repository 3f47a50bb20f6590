"""What a succeeded job tells the planner: its measured peak, and what it was measured on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.calibration.repository import MeasuredPeak
from worker import gpus


def measured_peak(
    outcome: dict[str, Any], visible_devices: str | None, output_dir: Path, base_model_dir: str
) -> MeasuredPeak | None:
    """None on a CPU worker: there the measured peak is the process's resident memory, and the planner predicts
    GPU memory, so the two are not comparable and a CPU row must never correct a GPU plan."""
    peak = outcome.get("measured_peak_bytes")
    gpu = gpus.identity(visible_devices)
    if peak is None or gpu is None:
        return None
    summary = _document(output_dir / "summary.json")
    config = _document(Path(base_model_dir) / "config.json")
    return MeasuredPeak(
        gpu_model=gpu.model,
        driver=gpu.driver,
        library_versions=summary.get("versions", {}),
        architecture=str(config.get("model_type", "unknown")),
        measured_peak_bytes=peak,
    )


def _document(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} if it cannot be read: a missing detail must not keep a success unrecorded."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}
