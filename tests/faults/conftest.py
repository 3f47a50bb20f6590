"""Fixtures for fault injection: a fresh miniature deployment per test (tests/harness.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from harness import Stack, running_stack


@pytest.fixture()
def stack(database, settings, tmp_path) -> Iterator[Stack]:
    """The API and two workers, w1 and w2."""
    with running_stack(tmp_path) as deployment:
        deployment.start_api()
        for name in ("w1", "w2"):
            deployment.start_worker(name)
        yield deployment


@pytest.fixture(scope="session")
def fault_dataset(data_root) -> str:
    rows = [{"instruction": f"Spell {i} backwards.", "output": str(i)[::-1] * 3} for i in range(40)]
    (data_root / "faults.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return "faults.jsonl"
