"""The GPU harness's case matrix and the accuracy script, checked without a GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

from domain.spec import JobSpec
from planner import plan
from planner.catalog import find_model

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_harness_cases_are_valid_worker_specs():
    harness = _load("vram_harness")
    assert len(harness.CASES) >= 20
    assert len({c["name"] for c in harness.CASES}) == len(harness.CASES)
    methods = {c["spec"]["method"] for c in harness.CASES}
    assert methods == {"qlora", "lora", "full", "freeze"}
    assert any(c["spec"].get("lora", {}).get("use_dora") for c in harness.CASES)
    from domain.spec import Optimizer

    assert {c["spec"]["memory"]["optimizer"] for c in harness.CASES} == {o.value for o in Optimizer}
    assert {c["spec"]["memory"]["fused_loss"] for c in harness.CASES} == {True, False}
    assert {c["spec"]["memory"]["gradient_checkpointing"] for c in harness.CASES} == {True, False}
    for c in harness.CASES:
        shape = find_model(c["model"])
        assert shape is not None, c["model"]
        assert plan(JobSpec.model_validate(c["spec"]), shape, None).peak_vram_bytes > 0


def test_harness_rows_feed_the_accuracy_script():
    harness, accuracy = _load("vram_harness"), _load("planner_accuracy")
    row = {"case": harness.CASES[0], "nvml_used": 10**10}
    predicted, allocated, phase = accuracy.predict(row, {})
    assert predicted > allocated > 0 and phase


def test_harness_imports_no_torch_at_top_level():
    code = (
        "import importlib.util, sys; "
        f"s = importlib.util.spec_from_file_location('h', {str(ROOT / 'benchmarks' / 'vram_harness.py')!r}); "
        "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
