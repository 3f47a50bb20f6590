"""The training child process: one per job, started with spawn so all its GPU memory dies with it.

It talks to its parent over a pipe and never touches the database: the parent is the only writer.
Messages are plain dicts: {"type": "progress" | "checkpoint" | "log" | "result" | "error", ...}.
"""

from __future__ import annotations

import dataclasses
import os
from multiprocessing.connection import Connection
from pathlib import Path


def job_process_main(spec_json: dict, base_model_dir: str, dataset_path: str, output_dir: str,
                     conn: Connection) -> None:
    # Must be set before torch initialises CUDA: expandable segments cut fragmentation for varying shapes.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from service.logs import configure_logging
    from service.settings import get_settings

    configure_logging(get_settings())
    import transformers

    transformers.utils.logging.disable_progress_bar()  # progress goes to the job's events, not to stderr bars
    try:
        result = _train(spec_json, base_model_dir, dataset_path, output_dir, conn)
    except BaseException as exc:  # every failure goes back to the parent, which records it on the job
        conn.send({"type": "error", **_describe(exc)})
        raise
    conn.send({"type": "result", **result})


def _train(spec_json: dict, base_model_dir: str, dataset_path: str, output_dir: str, conn: Connection) -> dict:
    from planner.spec import JobSpec
    from worker.gpus import process_used_bytes
    from worker.training.recipe import train

    result = train(JobSpec.model_validate(spec_json), base_model_dir=Path(base_model_dir),
                   dataset_path=Path(dataset_path), output_dir=Path(output_dir),
                   on_progress=lambda p: conn.send({"type": "progress", **dataclasses.asdict(p),
                                                    **_resident_memory()}),
                   on_checkpoint=lambda step, path: conn.send({"type": "checkpoint", "step": step, "path": path}),
                   on_resume=lambda step: conn.send({"type": "log", "message": f"resumed from step {step}",
                                                     "step": step}))
    # The planner predicts what NVML shows for this process (reserved memory plus the CUDA context),
    # so that is the measured peak when a GPU is present; torch's peak reserved is the fallback.
    nvml_bytes = process_used_bytes(os.getpid())
    return {**dataclasses.asdict(result), "measured_peak_bytes": nvml_bytes or result.peak_memory_bytes}


def _resident_memory() -> dict:
    """This process's resident set now and at its peak (VmRSS, VmHWM): the memory training uses on the CPU.

    Read from /proc (Linux); elsewhere nothing is reported rather than a guess.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {"process_resident_bytes": int(fields["VmRSS"].split()[0]) * 1024,
                "process_peak_resident_bytes": int(fields["VmHWM"].split()[0]) * 1024}
    except (OSError, KeyError, ValueError):
        return {}


def _describe(exc: BaseException) -> dict:
    from service.errors import ProblemError

    if isinstance(exc, ProblemError):
        return {"code": exc.code, "message": exc.detail, "retryable": exc.retryable}
    return {"code": "training_error", "message": f"{type(exc).__name__}: {exc}", "retryable": False}
