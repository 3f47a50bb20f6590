"""The worker's end of the pipe to its training process, against a real child process killed mid-run."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from worker.execution import ChildLink

CONTEXT = multiprocessing.get_context("spawn")


def _never_reads(conn) -> None:
    conn.send({"type": "progress", "step": 1})
    time.sleep(60)


@pytest.mark.parametrize("unread_by_the_child", [False, True])
def test_a_killed_child_reads_as_gone_whether_or_not_it_left_our_messages_unread(unread_by_the_child):
    parent, child = CONTEXT.Pipe()
    process = CONTEXT.Process(target=_never_reads, args=(child,), daemon=True)
    process.start()
    child.close()
    link = ChildLink()
    link.attach(parent)
    assert link.receive() == {"type": "progress", "step": 1}
    if unread_by_the_child:
        link.send({"type": "ack"})  # left in the child's end of the pipe: its death resets the connection
    os.kill(process.pid, signal.SIGKILL)
    process.join(10)
    assert link.receive() is None
    link.send({"type": "lease", "deadline": 0.0})  # and a send to a dead child is dropped, not raised
