"""Running one attempt of a job: claim it, stage its files, train it in a child process under a lease, relay
progress and checkpoints with fenced writes, honour cancels and drains, record the outcome.

Every write goes through service/jobs/attempts.py fenced by the attempt's number, so an attempt that lost
its lease (its worker was paused or cut off, and the reconciler handed the job to a newer attempt) writes
nothing: it stops its training process and returns. A training process that dies, a drain (SIGTERM), and a
retryable error all end the attempt and put the job back in the queue, where any worker can claim it and
resume from the last complete checkpoint in storage, up to Settings.max_attempts attempts in all.

Plain code with no Celery in it: the task in worker/tasks.py is a two-line adapter around execute_job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

from domain import messages
from domain.errors import TrainingOutOfMemory
from domain.spec import CHECKPOINT_METRICS_FILE
from domain.states import JobStatus
from service.db import in_transaction, transaction
from service.errors import StorageUnavailable
from service.jobs import attempts, recovery, repository
from service.jobs.attempts import Fence
from service.queue import enqueue_job
from service.settings import Settings
from service.storage import job_storage, local_copy
from worker import metrics as worker_metrics
from worker.job_process import job_process_main
from worker.job_ranks import AUTHKEY_ENV
from worker.measurements import measured_peak
from worker.shutdown import ShutdownRequest
from worker.slots import DeviceSlots, NotEnoughSlots, worker_slots

log = logging.getLogger(__name__)
TERMINATE_GRACE_SECONDS = 10
RANKS_CONNECT_SECONDS = 600  # torchrun starting N ranks that import torch and join their group, on a busy host
NOT_ENOUGH_SLOTS_RETRY_SECONDS = 5


@dataclass(frozen=True)
class ClaimedJob:
    fence: Fence
    spec: dict[str, Any]
    base_model_dir: str
    dataset_url: str
    validation_dataset_url: str | None
    predicted_peak_bytes: int
    resume_key: str | None  # the newest complete checkpoint in storage, if any
    resume_step: int | None
    lease_deadline: float  # monotonic time by which the claim's lease runs out


def claim(job_id: str, hostname: str, settings: Settings) -> ClaimedJob | None:
    """The guarded queued→running UPDATE: whoever wins it runs the job; a redelivered message loses."""
    deadline = time.monotonic() + settings.lease_seconds  # taken before the claim: never later than the lease

    def work(session) -> ClaimedJob | None:
        fence = attempts.claim(session, job_id, hostname, settings.lease_seconds)
        if fence is None:
            return None
        job = repository.get_job(session, job_id)
        latest = attempts.latest_checkpoint(session, job_id)
        return ClaimedJob(
            fence,
            job.spec,
            job.base_model_path,
            job.dataset_url,
            job.validation_dataset_url,
            job.predicted_peak_bytes,
            latest.storage_key if latest else None,
            latest.step if latest else None,
            deadline,
        )

    return in_transaction(work)


def execute_job(
    job_id: str,
    settings: Settings,
    hostname: str,
    shutdown: ShutdownRequest | None = None,
    slots: DeviceSlots | None = None,
) -> JobStatus | None:
    """Take the job's devices on this worker (worker/slots.py: first come, first served), claim it, run it."""
    shutdown = shutdown or ShutdownRequest()
    slots = slots or worker_slots([], settings.cpu_ranks)
    devices = _take_devices(job_id, settings, shutdown, slots)
    if devices is None:
        return None
    try:
        job = claim(job_id, hostname, settings)
        if job is None:
            log.info("job %s is not queued any more; skipping this delivery", job_id)
            return None
        workdir = settings.resolved_worker_dir / job_id / f"a{job.fence.number}"
        try:
            return AttemptRunner(job, settings, workdir, shutdown, slots.visible_devices(devices)).run()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            with contextlib.suppress(OSError):  # still holds another attempt's stage: that one removes it
                workdir.parent.rmdir()
    finally:
        slots.release(devices)


def _take_devices(job_id: str, settings: Settings, shutdown: ShutdownRequest, slots: DeviceSlots) -> list[str] | None:
    """The job's num_gpus slots, waiting in line for them; None (the message handled) if it is not queued, the
    worker drains, or it needs more devices than this worker has (sent back for another worker)."""
    count = in_transaction(lambda s: attempts.queued_devices(s, job_id))
    if count is None:
        log.info("job %s is not queued any more; skipping this delivery", job_id)
        return None
    wait = _QueueHold(job_id, settings, shutdown)
    try:
        devices = slots.acquire(count, give_up=wait.give_up)
    except NotEnoughSlots as exc:
        log.warning("job %s %s: sent back for a larger worker", job_id, exc)
        shutdown.drain.wait(NOT_ENOUGH_SLOTS_RETRY_SECONDS)  # no hot loop while no worker has enough
        _enqueue_or_leave_to_reconciler(job_id, settings)
        return None
    if devices is None and wait.still_queued and shutdown.drain.is_set():
        enqueue_job(job_id, settings)  # unclaimed: it goes back for another worker
    return devices


class _QueueHold:
    """give_up() for a job waiting for devices: True on a drain or once the job is no longer queued (cancelled);
    meanwhile its queued_at is kept fresh so the reconciler does not re-send the message this worker holds."""

    def __init__(self, job_id: str, settings: Settings, shutdown: ShutdownRequest) -> None:
        self.job_id, self.shutdown, self.still_queued = job_id, shutdown, True
        self.every, self.next_hold = settings.requeue_grace_seconds / 3, time.monotonic()

    def give_up(self) -> bool:
        if self.shutdown.drain.is_set():
            return True
        if time.monotonic() >= self.next_hold:
            self.next_hold = time.monotonic() + self.every
            self.still_queued = in_transaction(lambda s: attempts.hold_in_queue(s, self.job_id))
        return not self.still_queued


class AttemptRunner:
    def __init__(
        self,
        job: ClaimedJob,
        settings: Settings,
        workdir: Path,
        shutdown: ShutdownRequest,
        visible_devices: str | None = None,
    ) -> None:
        self.job, self.fence, self.settings, self.workdir = job, job.fence, settings, workdir
        self.shutdown, self.storage = shutdown, job_storage(settings)
        self.visible_devices = visible_devices  # CUDA_VISIBLE_DEVICES of the job's processes; None on the CPU
        self.output_dir = workdir / "output"
        self.lost = threading.Event()

    def run(self) -> JobStatus | None:
        started = time.monotonic()
        worker_metrics.job_started(self.fence.job_id, self.job.predicted_peak_bytes)
        outcome: dict[str, Any] = {}
        status = None
        try:  # a worker runs several jobs at once: each removes its own series, even if recording fails
            outcome = self._train()
            status = self._record(outcome)
        finally:
            worker_metrics.job_finished(
                self.fence.job_id,
                status.value if status else None,
                time.monotonic() - started,
                outcome.get("measured_peak_bytes"),
                self.job.predicted_peak_bytes,
                outcome.get("code"),
            )
        return status

    # --- one training process -----------------------------------------------------------------------------

    def _train(self) -> dict[str, Any]:
        try:
            dataset, validation = self._stage()
        except (StorageUnavailable, FileNotFoundError) as exc:
            return messages.error("staging_failed", f"could not stage the job's files: {exc}", retryable=True)
        link = ChildLink()
        sharded = self.job.spec["resources"].get("sharding") or self.job.spec["resources"].get("num_gpus", 1) > 1
        process = (self._launch_ranks if sharded else self._spawn_child)(link, dataset, validation)
        keeper = LeaseKeeper(self.fence, self.settings, link, process, self.lost)
        keeper.start()
        try:
            self._write(lambda s: attempts.set_child_pid(s, self.fence, process.pid))
            self._write(
                lambda s: attempts.add_event(
                    s,
                    self.fence,
                    "log",
                    {"message": f"training process {process.pid} started (attempt {self.fence.number})"},
                )
            )
            outcome = self._relay(process, link) if link.wait_attached(process, self.lost) else {"type": "crashed"}
        finally:
            keeper.stop()
            _reap(process)
            link.close()
        if outcome["type"] == "crashed":  # a SIGKILL (the kernel's OOM killer, an operator) leaves no message
            outcome["message"] = f"the training process exited with code {process.exitcode} without a result"
        return outcome

    def _spawn_child(self, link: ChildLink, dataset: Path, validation: Path | None):
        """One process (multiprocessing spawn) and a pipe to it."""
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=job_process_main,
            name=f"ftjobs-{self.fence.job_id}",
            daemon=False,
            args=(
                self.job.spec,
                self.job.base_model_dir,
                str(dataset),
                str(self.output_dir),
                child_end,
                self.job.lease_deadline,
                str(validation) if validation else None,
                self.visible_devices,
            ),
        )
        process.start()
        child_end.close()
        link.attach(parent_end)
        return process

    def _launch_ranks(self, link: ChildLink, dataset: Path, validation: Path | None) -> RankGroup:
        """torchrun with num_gpus ranks (worker/job_ranks.py) in a process group of its own; rank 0 connects back
        to a Unix socket in this attempt's private work dir."""
        address = str(self.workdir / "ranks.sock")
        launch_file = self.workdir / "launch.json"
        launch_file.write_text(
            json.dumps(
                {
                    "spec": self.job.spec,
                    "base_model_dir": self.job.base_model_dir,
                    "dataset_path": str(dataset),
                    "output_dir": str(self.output_dir),
                    "validation_path": str(validation) if validation else None,
                    "lease_deadline": self.job.lease_deadline,
                    "socket": address,
                }
            )
        )
        authkey = secrets.token_bytes(32)
        env = {**os.environ, AUTHKEY_ENV: authkey.hex()}
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        group = RankGroup.launch(self.job.spec["resources"]["num_gpus"], launch_file, env)
        link.listen(address, authkey)
        return group

    def _stage(self) -> tuple[Path, Path | None]:
        """The dataset, the validation dataset if any, and the checkpoint to resume from, on this machine's disk."""
        if self.job.resume_key:
            target = self.output_dir / "checkpoints" / f"step-{self.job.resume_step:06d}"
            self.storage.get_tree(self.job.resume_key, target)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        endpoint = self.settings.s3_endpoint_url
        validation = (
            local_copy(self.job.validation_dataset_url, self.workdir / "validation.jsonl", endpoint)
            if self.job.validation_dataset_url
            else None
        )
        return local_copy(self.job.dataset_url, self.workdir / "dataset.jsonl", endpoint), validation

    def _relay(self, process, link: ChildLink) -> dict[str, Any]:
        next_status_check, drain_deadline = 0.0, None
        while True:
            if self.lost.is_set():
                _stop(process)
                return {"type": "lost"}
            if self.shutdown.stop_now.is_set():
                _stop(process)
                return {"type": "drained", "detail": "the worker was told to stop at once"}
            if self.shutdown.drain.is_set() and drain_deadline is None:
                drain_deadline = time.monotonic() + self.settings.drain_seconds
                link.send(messages.drain())
            if drain_deadline is not None and time.monotonic() > drain_deadline:
                _stop(process)
                return {"type": "drained", "detail": f"no checkpoint within {self.settings.drain_seconds} s"}
            if link.conn.poll(self.settings.cancel_poll_seconds):
                message = link.receive()
                if message is None:  # the child is gone without a last word
                    return {"type": "crashed"}
                if message["type"] in messages.FINAL:
                    return message
                self._on_message(message, link)
            elif not process.is_alive():
                return {"type": "crashed"}
            if time.monotonic() >= next_status_check:
                next_status_check = time.monotonic() + self.settings.cancel_poll_seconds
                status = in_transaction(lambda s: attempts.status_of(s, self.fence))
                if status is None:
                    self.lost.set()
                elif status is JobStatus.cancelling:
                    _stop(process)
                    return {"type": "cancelled"}

    def _on_message(self, message: dict[str, Any], link: ChildLink) -> None:
        kind = message["type"]
        data = {key: value for key, value in message.items() if key != "type"}
        if kind == "progress":
            if self._write(lambda s: attempts.record_progress(s, self.fence, data)):
                worker_metrics.job_progress(self.fence.job_id, data)
        elif kind == "checkpoint":
            if self._publish_checkpoint(data["step"], self.output_dir / data["path"]):
                link.send(messages.ack())
        else:  # "log" ({message, ...}) becomes a job event as it is
            self._write(lambda s: attempts.add_event(s, self.fence, kind, data))

    def _publish_checkpoint(self, step: int, local_dir: Path) -> bool:
        """Upload under this attempt's own prefix (parts, then COMPLETE), then record it, fenced; prune."""
        key = f"jobs/{self.fence.job_id}/checkpoints/a{self.fence.number}-step-{step:06d}"
        if in_transaction(lambda s: attempts.status_of(s, self.fence)) is None:
            self.lost.set()
            return False
        self.storage.put_tree(local_dir, key)
        keep = self.job.spec["training"]["keep_checkpoints"]
        metrics_file = local_dir / CHECKPOINT_METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None

        def record(session) -> list[str] | None:
            if not attempts.record_checkpoint(session, self.fence, step, key, metrics):
                return None
            dropped = [c.storage_key for c in attempts.checkpoints_of(session, self.fence.job_id)[keep:]]
            attempts.forget_checkpoints(session, self.fence.job_id, dropped)
            return dropped

        dropped = self._write(record)
        for old_key in dropped or []:
            self.storage.delete_tree(old_key)
        return dropped is not None

    def _write(self, work) -> Any:
        """A fenced write; a falsy answer means the attempt was superseded, which stops it."""
        result = in_transaction(work)
        if result is None or result is False:
            self.lost.set()
        return result

    # --- the outcome --------------------------------------------------------------------------------------

    def _record(self, outcome: dict[str, Any]) -> JobStatus | None:
        kind, code = outcome["type"], outcome.get("code")
        if kind == "lost" or code == "lease_lost" or self.lost.is_set():
            log.warning("job %s: attempt %d lost its lease; stopped without writing", *self._ids())
            return None
        if kind == "result":
            return self._succeed(outcome)
        if kind == "cancelled" or code == "cancelled":
            return self._finish(JobStatus.cancelled, "cancelled")
        if kind == "drained" or code == "drained":
            return self._release("drained", outcome.get("detail") or outcome.get("message", "drained"))
        if kind == "crashed" or outcome.get("retryable"):
            return self._release("crashed" if kind == "crashed" else code, _failure(outcome))
        if code == TrainingOutOfMemory.code:
            return self._recover(outcome)
        return self._finish(JobStatus.failed, "failed", error_code=code, error_message=outcome["message"])

    def _succeed(self, outcome: dict[str, Any]) -> JobStatus | None:
        prefix = f"jobs/{self.fence.job_id}/artifacts"
        artifacts = []
        for name in outcome["artifacts"]:
            self.storage.put_file(self.output_dir / name, f"{prefix}/{name}")
            artifacts.append({"name": name, "size_bytes": (self.output_dir / name).stat().st_size})
        # The checkpoints stay, already pruned to keep_checkpoints: they are listed and downloadable after success.
        return self._finish(
            JobStatus.succeeded,
            "succeeded",
            artifacts=artifacts,
            measured_peak_bytes=outcome.get("measured_peak_bytes"),
            measured=measured_peak(outcome, self.visible_devices, self.output_dir, self.job.base_model_dir),
        )

    def _finish(self, to: JobStatus, outcome: str, **fields: Any) -> JobStatus | None:
        if not in_transaction(lambda s: attempts.finish(s, self.fence, to, outcome, **fields)):
            log.warning("job %s: attempt %d was superseded before it could record %s", *self._ids(), outcome)
            return None
        return to

    def _release(self, outcome: str, detail: str) -> JobStatus | None:
        status = in_transaction(lambda s: attempts.release(s, self.fence, outcome, detail, self.settings.max_attempts))
        if status is JobStatus.queued:
            log.info("job %s: attempt %d ended (%s); back in the queue", *self._ids(), outcome)
            _enqueue_or_leave_to_reconciler(self.fence.job_id, self.settings)
        return status

    def _recover(self, failure: dict[str, Any]) -> JobStatus | None:
        """Out of memory: re-planned and back in the queue to resume from its checkpoint, or failed with the figures
        (service/jobs/recovery.py)."""
        status = in_transaction(lambda s: recovery.after_out_of_memory(s, self.fence, failure, self.settings))
        if status is JobStatus.queued:
            log.info("job %s: attempt %d ran out of memory; re-planned and back in the queue", *self._ids())
            _enqueue_or_leave_to_reconciler(self.fence.job_id, self.settings)
        return status

    def _ids(self) -> tuple[str, int]:
        return self.fence.job_id, self.fence.number


class ChildLink:
    """The parent's end of the connection to the training process (rank 0 of a sharded job); the lease keeper and
    the relay loop both send on it. Messages sent before it is attached (ranks still starting) are dropped: the
    lease keeper sends a fresh deadline every renewal."""

    def __init__(self) -> None:
        self.conn: Connection | None = None
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._authkey = b""

    def attach(self, conn: Connection) -> None:
        self.conn = conn

    def listen(self, address: str, authkey: bytes) -> None:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(address)
        self._server.listen(1)
        self._server.settimeout(1.0)
        self._authkey = authkey

    def wait_attached(self, process, lost: threading.Event) -> bool:
        """Until rank 0 connected and proved it holds the launch's key; False if the ranks died first."""
        deadline = time.monotonic() + RANKS_CONNECT_SECONDS
        while self.conn is None:
            if lost.is_set() or not process.is_alive() or time.monotonic() > deadline:
                return False
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            conn = Connection(client.detach())
            try:  # the same handshake as multiprocessing's Listener.accept
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
            except Exception as exc:  # not our rank 0 (or it died mid-handshake): wait for the real one
                log.warning("a connection to the ranks' socket failed the handshake: %s", exc)
                conn.close()
                continue
            with self._lock:
                self.conn = conn
        return True

    def send(self, message: dict) -> None:
        with self._lock:
            if self.conn is None:
                return
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):
                pass  # the child is gone; the relay loop sees that and records the outcome

    def receive(self) -> dict | None:
        """The child's next message; None once the child is gone. A child killed with our unread ack or lease
        deadline still in its end of the pipe resets the connection instead of closing it."""
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError):
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self._server is not None:
            self._server.close()


class RankGroup:
    """A torchrun launch, in a session of its own. torchrun starts each rank in yet another session, and each rank
    arms PR_SET_PDEATHSIG on the agent (worker/job_ranks.py): a SIGTERM to the agent makes it stop its ranks, and
    a SIGKILL to it kills them too, so stopping the agent leaves no rank. It answers the calls the relay loop
    makes of a multiprocessing.Process."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen, self.pid = popen, popen.pid

    @classmethod
    def launch(cls, ranks: int, launch_file: Path, env: dict[str, str]) -> RankGroup:
        command = [sys.executable, "-m", "worker.job_ranks", "--agent", str(ranks), str(launch_file)]
        return cls(subprocess.Popen(command, env=env, start_new_session=True, stdin=subprocess.DEVNULL))

    @property
    def exitcode(self) -> int | None:
        return self.popen.returncode

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return
        self._signal(signal.SIGKILL)  # the agent is gone: no rank may outlive it

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):  # nobody left in the group
            os.killpg(self.pid, signum)


class LeaseKeeper(threading.Thread):
    """Renews the attempt's lease every renew interval and passes the new deadline to the child. A renewal the
    database refuses (the job moved on to a newer attempt) kills the child at once; one that cannot reach the
    database is tried again next interval, and the child stops itself if its deadline passes meanwhile."""

    def __init__(self, fence: Fence, settings: Settings, link: ChildLink, process, lost: threading.Event) -> None:
        super().__init__(name=f"lease-{fence.job_id}", daemon=True)
        self.fence, self.settings, self.link, self.process, self.lost = fence, settings, link, process, lost
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.settings.renew_seconds):
            sent_at = time.monotonic()
            try:
                with transaction() as session:
                    renewed = attempts.renew_lease(session, self.fence, self.settings.lease_seconds)
            except Exception as exc:  # the database is unreachable: try again next interval
                log.warning("job %s: lease renewal failed (%s: %s)", self.fence.job_id, type(exc).__name__, exc)
                continue
            if not renewed:
                self.lost.set()
                self.process.kill()
                return
            self.link.send(messages.lease(sent_at + self.settings.lease_seconds))

    def stop(self) -> None:
        self._stopped.set()


def _enqueue_or_leave_to_reconciler(job_id: str, settings: Settings) -> None:
    try:
        enqueue_job(job_id, settings)
    except Exception as exc:  # the broker is down: the job is queued in the database, and the reconciler resends
        log.warning("job %s: could not send its message (%s); the reconciler will", job_id, exc)


def _failure(outcome: dict[str, Any]) -> str:
    return f"{outcome['code']}: {outcome['message']}" if outcome["type"] == "error" else outcome["message"]


def _stop(process) -> None:
    process.terminate()
    process.join(TERMINATE_GRACE_SECONDS)
    if process.is_alive():
        process.kill()
        process.join()


def _reap(process) -> None:
    process.join(TERMINATE_GRACE_SECONDS)
    if process.is_alive():
        _stop(process)


def requeue_orphans(hostname: str, settings: Settings) -> list[str]:
    """Attempts this worker name was running when it last stopped are dead: hand their jobs on now rather than
    a lease later. (A worker name is one process at a time.)"""

    def release_all(session) -> list[tuple[str, JobStatus | None]]:
        return [
            (
                fence.job_id,
                attempts.release(
                    session, fence, "worker_restarted", f"worker {hostname} restarted", settings.max_attempts
                ),
            )
            for fence in attempts.running_on(session, hostname)
        ]

    released = in_transaction(release_all)
    for job_id, status in released:
        if status is JobStatus.queued:
            _enqueue_or_leave_to_reconciler(job_id, settings)
    return [job_id for job_id, _ in released]
