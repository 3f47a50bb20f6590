"""Imports flow one way: domain ← planner ← service ← worker, and the training engine (worker/training) imports only
domain and planner, never service. Only the worker's training code imports torch. The client (ftjobs.client)
imports none of them. Checked twice: what a fresh interpreter loads, and every import statement in the source."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

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


# ---- the static rules: every import statement of every module, the lazy ones inside functions included ----------
ROOT = Path(__file__).resolve().parents[1]
OURS = ("domain", "planner", "service", "worker", "ftjobs", "migrations")
HEAVY = {"torch", "transformers", "peft", "bitsandbytes", "torchao", "galore_torch", "badam", "accelerate"}
WEB_AND_DATA = {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery", "kombu", "redis"}
# package -> the packages of ours it may import (a longer prefix is the more specific rule)
MAY_IMPORT = {
    "domain": {"domain"},
    "planner": {"domain", "planner"},
    "service": {"domain", "planner", "service"},
    "worker": {"domain", "planner", "service", "worker"},
    # the training engine runs in the child process: it knows the domain and the planner's policy, not HTTP
    "worker.training": {"domain", "planner", "worker.training"},
    "ftjobs.client": set(),
}
MUST_NOT_IMPORT = {
    "domain": HEAVY | WEB_AND_DATA,
    "planner": HEAVY | WEB_AND_DATA,
    "service": HEAVY,
    "worker.training": WEB_AND_DATA,
    "ftjobs.client": HEAVY | WEB_AND_DATA,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, resolved for relative imports."""
    found, package = set(), module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in ALL_MODULES}
    return found


ALL_MODULES = {
    module_name(path) for package in OURS for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts
}


def rule_for(module: str, table: dict) -> str | None:
    matches = [prefix for prefix in table if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=len) if matches else None


def violations(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        module = module_name(path)
        for imported in sorted(imports_of(path)):
            top, allowed_rule, banned_rule = imported.split(".")[0], rule_for(module, MAY_IMPORT), None
            if top in OURS and allowed_rule is not None:
                if not any(imported == ok or imported.startswith(ok + ".") for ok in MAY_IMPORT[allowed_rule]):
                    out.append(
                        f"{module} imports {imported} ({allowed_rule} may import {sorted(MAY_IMPORT[allowed_rule])})"
                    )
            banned_rule = rule_for(module, MUST_NOT_IMPORT)
            if banned_rule is not None and top in MUST_NOT_IMPORT[banned_rule]:
                out.append(f"{module} imports {imported} ({banned_rule} must not import {top})")
    return out


def our_paths() -> list[Path]:
    return sorted(
        path for package in OURS for path in (ROOT / package).rglob("*.py") if "__pycache__" not in path.parts
    )


def test_every_import_follows_the_layers():
    assert violations(our_paths()) == []


def test_a_deliberate_violation_is_caught(tmp_path):
    offender = ROOT / "worker" / "training" / "_layering_probe.py"
    offender.write_text("def f():\n    from service.errors import InvalidSpec\n\n    return InvalidSpec\n")
    try:
        found = violations([offender])
    finally:
        offender.unlink()
    assert found == [
        "worker.training._layering_probe imports service.errors "
        "(worker.training may import ['domain', 'planner', 'worker.training'])"
    ]


def cycles(package: str) -> list[list[str]]:
    """Import cycles among the modules of one package (lazy imports count: a late import is how a cycle hides)."""
    graph = {
        module_name(path): {m for m in imports_of(path) if m in ALL_MODULES and m.startswith(package + ".")}
        for path in our_paths()
        if module_name(path).startswith(package + ".")
    }
    found, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


@pytest.mark.parametrize("package", ["domain", "planner"])
def test_no_import_cycles(package):
    assert cycles(package) == []
