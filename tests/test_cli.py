"""`ftjobs plan`: JSON on stdout, exit 0 whether it fits or not, exit 2 with a problem for an invalid spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_plan(tmp_path, spec: dict | str) -> subprocess.CompletedProcess:
    path = tmp_path / "spec.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    # A fresh home and no database: the plan needs no server and creates nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("FTJOBS_DATABASE_URL", "FTJOBS_REDIS_URL")}
    env["FTJOBS_HOME"] = str(tmp_path / "home")
    result = subprocess.run([sys.executable, "-m", "ftjobs.cli", "plan", str(path)], capture_output=True,
                            text=True, env=env)
    assert not (tmp_path / "home").exists()
    return result


def test_plan_that_fits_and_one_that_does_not_both_exit_0(tmp_path):
    fits = run_plan(tmp_path, {"base_model": "Qwen/Qwen2.5-0.5B", "method": "qlora",
                               "resources": {"gpu_memory_gib": 80}})
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["fits"] is True
    too_big = run_plan(tmp_path, {"base_model": "Qwen/Qwen2.5-7B", "method": "full",
                                  "resources": {"gpu_memory_gib": 1}})
    assert too_big.returncode == 0, too_big.stderr
    plan = json.loads(too_big.stdout)
    assert plan["fits"] is False and plan["peak_vram_bytes"] > plan["gpu_memory_bytes"]


def test_invalid_spec_exits_2_with_a_problem(tmp_path):
    result = run_plan(tmp_path, {"base_model": "Qwen/Qwen2.5-0.5B", "methd": "qlora"})
    assert result.returncode == 2
    assert json.loads(result.stderr)["code"] == "invalid_spec" and "methd" in result.stderr
    not_json = run_plan(tmp_path, "{not json")
    assert not_json.returncode == 2 and json.loads(not_json.stderr)["code"] == "invalid_spec"
    unknown_model = run_plan(tmp_path, {"base_model": "nobody/unknown-model"})
    assert unknown_model.returncode == 2 and json.loads(unknown_model.stderr)["code"] == "base_model_not_found"
