"""Run by tests/e2e/test_oom_recovery.py in a fresh interpreter, as a job process is: one optimizer step on the long
rows at each micro-batch size given, printing the process's peak address space (VmPeak, what RLIMIT_AS counts)
after each, as JSON. Big tensors are mmapped and unmapped when freed, so each step's peak is its own."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def peak_address_space_bytes() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmPeak"].split()[0]) * 1024


def main(spec_path: str, model_dir: str, dataset_path: str, work_dir: str, *micro_batch_sizes: str) -> None:
    from domain.spec import JobSpec
    from worker.training.recipe import train

    document = json.loads(Path(spec_path).read_text())
    peaks = {}
    for size in micro_batch_sizes:
        document["training"].update(micro_batch_size=int(size), gradient_accumulation_steps=1, max_steps=1)
        document["training"].pop("epochs", None)
        train(
            JobSpec.model_validate(document),
            base_model_dir=Path(model_dir),
            dataset_path=Path(dataset_path),
            output_dir=Path(work_dir) / f"micro-batch-{size}",
        )
        peaks[size] = peak_address_space_bytes()
    print(json.dumps(peaks))


if __name__ == "__main__":
    main(*sys.argv[1:])
