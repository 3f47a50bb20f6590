"""The planner's figures do not move unless a change means them to: every calibration row's plan and a grid of
specs (benchmarks/planner_golden.py) equal, byte for byte, what was recorded in golden_predictions.json."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _golden_module():
    spec = importlib.util.spec_from_file_location("planner_golden", ROOT / "benchmarks" / "planner_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_recorded_plan_is_unchanged():
    golden = _golden_module()
    expected = json.loads(golden.GOLDEN.read_text())
    actual = golden.current()
    assert len(actual["calibration"]) >= 100 and len(actual["grid"]) >= 2000
    assert golden.differences(expected, actual) == []


def test_a_moved_figure_is_caught():
    golden = _golden_module()
    expected = json.loads(golden.GOLDEN.read_text())
    key = next(iter(expected["calibration"]))
    moved = json.loads(json.dumps(expected))
    moved["calibration"][key]["peak_vram_bytes"] += 1
    assert golden.differences(expected, moved) == [f"calibration {key}"]
