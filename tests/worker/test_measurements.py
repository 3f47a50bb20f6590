"""A succeeded job's measurement for the planner (worker/measurements.py): none without a GPU, whose peak is the
host's resident memory and not what the planner predicts."""

from __future__ import annotations

import pytest

from worker.gpus import list_gpus
from worker.measurements import measured_peak


def test_a_cpu_job_gives_the_planner_no_measurement(tmp_path):
    outcome = {"measured_peak_bytes": 512 * 2**20}
    assert measured_peak(outcome, None, tmp_path, str(tmp_path)) is None


@pytest.mark.skipif(not list_gpus(), reason="needs an NVIDIA GPU: the measurement names it through NVML")
def test_a_gpu_job_is_measured_on_its_gpu_model(tmp_path):
    (tmp_path / "summary.json").write_text('{"versions": {"torch": "2.x"}}')
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    measured = measured_peak({"measured_peak_bytes": 2**30}, "0", tmp_path, str(tmp_path))
    assert measured is not None
    assert measured.gpu_model == list_gpus()[0].name and measured.driver
    assert (measured.architecture, measured.library_versions) == ("llama", {"torch": "2.x"})
    assert measured.measured_peak_bytes == 2**30
