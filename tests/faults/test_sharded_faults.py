"""Faults on sharded jobs (2 gloo ranks per job, FTJOBS_CPU_RANKS=2): a worker killed with its torchrun launch
takes every rank with it and another worker resumes from the sharded checkpoint; a drain reaches every rank at
the same step, so the job checkpoints there and finishes elsewhere."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ProcessWatcher, Stack, _running, job_spec, running_stack, wait_until

pytestmark = [pytest.mark.timeout(420)]


@pytest.fixture()
def rank_stack(database, settings, tmp_path) -> Iterator[Stack]:
    """The API and two workers with two CPU slots each."""
    with running_stack(tmp_path, FTJOBS_CPU_RANKS="2") as deployment:
        deployment.start_api()
        for name in ("w1", "w2"):
            deployment.start_worker(name)
        yield deployment


def sharded_spec(model_dir: Path, dataset: str) -> dict:
    spec = job_spec(model_dir, dataset)
    spec["training"]["micro_batch_size"] = 1  # per rank: the same global batch of 2 rows
    return spec | {"resources": {"num_gpus": 2, "sharding": "zero3"}}


def ranks_of(agent: int) -> list[int]:
    ranks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == agent:
                    ranks.append(int(entry.name))
            except OSError:
                continue
    return ranks


def test_a_killed_worker_takes_its_ranks_with_it_and_another_resumes_the_job(rank_stack, tiny_model, fault_dataset):
    with ProcessWatcher(rank_stack) as watcher:
        job_id = watcher.watch(rank_stack.submit(sharded_spec(tiny_model, fault_dataset)))
        first = rank_stack.running_attempt(job_id, 1)
        checkpoint = rank_stack.wait_for_checkpoint(job_id, 1)
        agent = rank_stack.child_pid(job_id, 1)
        ranks = ranks_of(agent)
        assert len(ranks) == 2
        rank_stack.worker_of(first["worker"]).signal_group(signal.SIGKILL)  # the worker's own group only
        wait_until(lambda: not any(_running(pid) for pid in [agent, *ranks]), 10, "the ranks to die with the worker")
        job = rank_stack.wait_for_end(job_id, timeout_seconds=360)
    rank_stack.assert_succeeded_once(job)
    lost, taken_over = job["attempts"]
    assert lost["outcome"] == "lease_expired" and taken_over["worker"] != lost["worker"]
    assert taken_over["resumed_from_step"] >= checkpoint["data"]["step"] > 0
    assert not watcher.overlaps


def test_a_drain_stops_every_rank_at_one_step_and_the_job_resumes_there(rank_stack, tiny_model, fault_dataset):
    with ProcessWatcher(rank_stack) as watcher:
        job_id = watcher.watch(rank_stack.submit(sharded_spec(tiny_model, fault_dataset)))
        first = rank_stack.running_attempt(job_id, 1)
        periodic = rank_stack.wait_for_checkpoint(job_id, 1)
        draining = rank_stack.worker_of(first["worker"])
        draining.process.send_signal(signal.SIGTERM)
        assert draining.process.wait(timeout=90) == 0
        job = rank_stack.wait_for_end(job_id, timeout_seconds=360)
    rank_stack.assert_succeeded_once(job)
    drained, finished = job["attempts"]
    assert drained["outcome"] == "drained" and finished["worker"] != drained["worker"]
    events = rank_stack.events(job_id)
    drain_checkpoint = [e for e in events if e["kind"] == "checkpoint" and e["data"]["attempt"] == 1][-1]
    assert finished["resumed_from_step"] == drain_checkpoint["data"]["step"] >= periodic["data"]["step"]
    assert not watcher.overlaps
