"""The processes of a sharded job. The worker starts `-m worker.job_ranks --agent N FILE`, which arms
PR_SET_PDEATHSIG and becomes the torchrun agent (exec, so the signal stays armed); torchrun then starts N ranks,
each `-m worker.job_ranks FILE`.

FILE is the launch's JSON (worker/execution.py writes it in the attempt's private work dir): the spec, the staged
paths, the lease deadline and the parent's Unix socket. Rank 0 connects to the socket and proves it was started
by this worker (multiprocessing's HMAC challenge with the key in FTJOBS_JOB_AUTHKEY, both ways); it then talks to
the parent exactly as a one-device job does over its pipe (worker/job_process.py). The other ranks only train.

Each rank dies with the torchrun agent that started it (PR_SET_PDEATHSIG), the agent with the worker; the worker
ends the whole process group on cancel, lease loss or crash.
"""

from __future__ import annotations

import json
import os
import sys
from multiprocessing.connection import Client
from pathlib import Path

from worker.job_process import ParentLink, RankLink, _start_child, run_job

AUTHKEY_ENV = "FTJOBS_JOB_AUTHKEY"


def become_agent(ranks: int, launch_file: str) -> None:
    """exec torchrun on this machine alone (--standalone: a free local rendezvous port per job), no restarts:
    a failed rank fails the attempt, and the worker's retry resumes it from its last checkpoint."""
    _start_child()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    options = ["--nproc-per-node", str(ranks), "--max-restarts", "0"]
    os.execv(sys.executable, [*torchrun, *options, "-m", "worker.job_ranks", launch_file])


def main(launch_file: str) -> None:
    _start_child()
    launch = json.loads(Path(launch_file).read_text())
    from worker.training.ranks import join_process_group, leave_process_group

    ranks = join_process_group()
    try:
        if ranks.is_main:
            authkey = bytes.fromhex(os.environ.pop(AUTHKEY_ENV))
            link: ParentLink | RankLink = ParentLink(
                Client(launch["socket"], family="AF_UNIX", authkey=authkey), launch["lease_deadline"]
            )
        else:
            os.environ.pop(AUTHKEY_ENV, None)
            link = RankLink()
        run_job(
            link,
            launch["spec"],
            launch["base_model_dir"],
            launch["dataset_path"],
            launch["output_dir"],
            launch["validation_path"],
            ranks,
        )
    finally:
        leave_process_group(ranks)


if __name__ == "__main__":
    if sys.argv[1] == "--agent":
        become_agent(int(sys.argv[2]), sys.argv[3])
    else:
        main(sys.argv[1])
