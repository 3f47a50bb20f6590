"""The training child process: one per attempt, started with spawn so all its GPU memory dies with it.

It never touches the database or the shared storage: the parent (worker/execution.py) is the only writer, and
every write it makes is fenced by the attempt. The two talk over one duplex pipe of plain dicts
(domain/messages.py). A checkpoint message waits for its ack, so the local copy cannot be pruned while the
parent uploads it.

The child stops by itself, writing nothing more, once its lease deadline passes without a renewal: a worker
that was paused (SIGSTOP) or cut off from the database past its lease may already have been replaced, and
CLOCK_MONOTONIC is the same clock in parent and child. It ignores SIGINT, so a Ctrl-C on `ftjobs up` reaches
the job as a drain from its worker, and it dies with its parent (PR_SET_PDEATHSIG) so an orphan never trains.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

from domain import messages
from domain.errors import DomainError, LeaseLost, TrainingOutOfMemory


class ParentLink:
    def __init__(self, conn: Connection, lease_deadline: float) -> None:
        self.conn, self.lease_deadline, self.drain_requested = conn, lease_deadline, False

    def send(self, message: dict) -> None:
        self._check_lease()
        self.conn.send(message)

    def should_stop(self) -> bool:
        """Called before every micro-step: raises LeaseLost past the lease; a cancel is the parent's SIGTERM."""
        self._check_lease()
        return False

    def should_drain(self) -> bool:
        self._read_pending()
        return self.drain_requested

    def checkpoint_saved(self, step: int, path: str) -> None:
        self.send(messages.checkpoint(step, path))
        while not self._handle(self.conn.recv()):
            pass

    def _read_pending(self) -> None:
        while self.conn.poll(0):
            self._handle(self.conn.recv())

    def _handle(self, message: dict) -> bool:
        """Apply one parent message; True for the checkpoint ack."""
        if message["type"] == "lease":
            self.lease_deadline = max(self.lease_deadline, message["deadline"])
        elif message["type"] == "drain":
            self.drain_requested = True
        return message["type"] == "ack"

    def _check_lease(self) -> None:
        self._read_pending()  # renewals queue up in the pipe while the model loads
        if time.monotonic() > self.lease_deadline:
            raise LeaseLost("the lease ran out without a renewal; a newer attempt may own the job")


class RankLink:
    """What a sharded job's ranks other than 0 steer by: nothing. Rank 0 talks to the parent and broadcasts the
    decisions every rank must share (drain); a cancel or a lost lease kills the whole process group."""

    def send(self, message: dict) -> None:
        """Dropped: rank 0 sends progress, logs and the result."""

    def should_stop(self) -> bool:
        return False

    def should_drain(self) -> bool:
        return False  # rank 0's answer reaches every rank (Ranks.from_main)

    def checkpoint_saved(self, step: int, path: str) -> None:
        """Nothing to wait for: rank 0 waits for the worker's upload."""


def job_process_main(
    spec_json: dict,
    base_model_dir: str,
    dataset_path: str,
    output_dir: str,
    conn: Connection,
    lease_deadline: float,
    validation_path: str | None = None,
    devices: str | None = None,
) -> None:
    """A one-device job: the child the worker starts with multiprocessing's spawn."""
    if devices is not None:  # before torch initialises CUDA: this job sees only its own GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    _start_child()
    run_job(ParentLink(conn, lease_deadline), spec_json, base_model_dir, dataset_path, output_dir, validation_path)


def run_job(
    link: ParentLink | RankLink,
    spec_json: dict,
    base_model_dir: str,
    dataset_path: str,
    output_dir: str,
    validation_path: str | None,
    ranks=None,
) -> None:
    """Train, and send the result, or the error, to the parent (rank 0's link; the other ranks' is silent)."""
    allocator_note = _configure_allocator()
    from service.logs import configure_logging
    from service.settings import get_settings

    settings = get_settings()
    configure_logging(settings)
    limit_note = _limit_address_space(settings.job_memory_limit_bytes)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # progress goes to the job's events, not to stderr bars
    try:
        for note in (allocator_note, limit_note):
            if note:
                link.send(messages.log(note))
        result = _train(spec_json, base_model_dir, dataset_path, output_dir, link, validation_path, ranks)
    except BaseException as exc:  # every failure goes back to the parent, which records it on the job
        link.send(_describe(exc, ranks))
        raise
    link.send(messages.result(**result))


def _train(
    spec_json: dict,
    base_model_dir: str,
    dataset_path: str,
    output_dir: str,
    link: ParentLink | RankLink,
    validation_path: str | None,
    ranks,
) -> dict:
    from domain.spec import JobSpec
    from worker.gpus import process_used_bytes
    from worker.training.ranks import Ranks
    from worker.training.recipe import train

    ranks = ranks or Ranks()
    result = train(
        JobSpec.model_validate(spec_json),
        base_model_dir=Path(base_model_dir),
        dataset_path=Path(dataset_path),
        output_dir=Path(output_dir),
        validation_path=Path(validation_path) if validation_path else None,
        on_progress=lambda p: link.send(messages.progress(p, **_resident_memory())),
        should_stop=link.should_stop,
        should_drain=link.should_drain,
        on_checkpoint=link.checkpoint_saved,
        on_resume=lambda step: link.send(messages.log(f"resumed from step {step}", step=step)),
        on_compiled=lambda seconds: link.send(
            messages.log(f"compiled the decoder layers in {seconds:.1f} s, before step 1", compile_seconds=seconds)
        ),
        ranks=ranks,
    )
    # The planner predicts what NVML shows for this process (reserved memory plus the CUDA context),
    # so that is the measured peak when a GPU is present; torch's peak reserved is the fallback.
    # Every rank measures its own; the job records the largest.
    per_rank = ranks.every(process_used_bytes(os.getpid()) or result.peak_memory_bytes)
    if ranks.world > 1:
        host = ranks.every(_resident_memory().get("process_peak_resident_bytes"))
        link.send(messages.log(_rank_peaks_line(per_rank, host), rank_peak_bytes=per_rank, rank_peak_host_bytes=host))
    measured = [peak for peak in per_rank if peak is not None]
    return {**dataclasses.asdict(result), "measured_peak_bytes": max(measured) if measured else None}


def _rank_peaks_line(device: list[int | None], host: list[int | None]) -> str:
    def gib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**30:.2f} GiB"

    return "peak memory per rank: " + ", ".join(
        f"rank {rank}: device {gib(on_device)}, host {gib(on_host)}"
        for rank, (on_device, on_host) in enumerate(zip(device, host, strict=True))
    )


def _start_child() -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _configure_allocator() -> str | None:
    """Set the CUDA caching allocator the plan was calibrated with (before torch initialises CUDA). An operator's
    own setting is kept; the note returned says the plan's memory prediction assumed the policy's."""
    from planner import policy

    configured = os.environ.setdefault(policy.ALLOCATOR_ENV, policy.ALLOCATOR_CONF)
    if configured == policy.ALLOCATOR_CONF:
        return None
    return (
        f"{policy.ALLOCATOR_ENV}={configured!r} is kept, but the plan assumed {policy.ALLOCATOR_CONF!r}: "
        "its memory prediction may not hold"
    )


def _limit_address_space(limit_bytes: int | None) -> str | None:
    """FTJOBS_JOB_MEMORY_LIMIT_BYTES: this process's address space (RLIMIT_AS), so a CPU job runs out of memory as a
    GPU job does, with a real failed allocation, and takes the same recovery path. Not on a GPU: the CUDA driver
    reserves far more address space than it uses, and the device's own memory is the limit there."""
    if limit_bytes is None:
        return None
    import resource

    import torch

    if torch.cuda.is_available():
        return f"job_memory_limit_bytes {limit_bytes} is ignored on a GPU: the device's memory is the limit"
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return f"address space limited to {limit_bytes / 2**30:.2f} GiB (job_memory_limit_bytes)"


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when the worker that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the call: nobody would ever read our results
        os._exit(1)


def _resident_memory() -> dict:
    """This process's resident set now and at its peak (VmRSS, VmHWM): the memory training uses on the CPU.

    Read from /proc (Linux); elsewhere nothing is reported rather than a guess.
    """
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return {
            "process_resident_bytes": int(fields["VmRSS"].split()[0]) * 1024,
            "process_peak_resident_bytes": int(fields["VmHWM"].split()[0]) * 1024,
        }
    except (OSError, KeyError, ValueError):
        return {}


def _describe(exc: BaseException, ranks=None) -> dict:
    if isinstance(exc, TrainingOutOfMemory):  # the figures the worker re-plans the job against
        peak = exc.extra.get("measured_peak_bytes") or _resident_memory().get("process_peak_resident_bytes")
        return messages.error(
            exc.code,
            exc.detail,
            exc.retryable,
            step=exc.extra.get("step"),
            device=exc.extra.get("device"),
            measured_peak_bytes=peak,
        )
    if isinstance(exc, DomainError):
        return messages.error(exc.code, exc.detail, exc.retryable)
    if ranks is not None and ranks.distributed:
        from worker.training.ranks import lost_a_peer

        if lost_a_peer(exc):
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return messages.error("rank_lost", f"another rank of this job died: {first_line[:300]}", retryable=True)
    return messages.error("training_error", f"{type(exc).__name__}: {exc}", retryable=False)
