"""Imports flow one way: planner ← service ← worker. Only the worker's training code imports torch. The client
(ftjobs.client) imports none of them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def modules_loaded_by(statement: str) -> set[str]:
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in json.loads(result.stdout.splitlines()[-1])}


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        (
            "import planner, planner.core, planner.catalog",
            {"torch", "fastapi", "sqlalchemy", "celery", "transformers", "service", "worker"},
        ),
        ("import service.app, service.jobs.service, service.queue", {"torch", "transformers", "peft", "worker"}),
        ("import worker.celery_app, worker.tasks", {"torch", "transformers", "peft"}),
        # The client is what an app may vendor: httpx and pydantic, nothing of the server.
        ("import ftjobs.client", {"service", "worker", "planner", "torch", "fastapi", "sqlalchemy", "celery"}),
    ],
)
def test_import_direction(statement, forbidden):
    assert modules_loaded_by(statement).isdisjoint(forbidden)
