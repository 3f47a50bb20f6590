"""`ftjobs plan`: JSON on stdout, exit 0 whether it fits or not, exit 2 with a problem for an invalid spec; the
client commands with no server (exit 3, one line); help on every command and option; keys."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest


def run_plan(tmp_path, spec: dict | str, *options: str) -> subprocess.CompletedProcess:
    path = tmp_path / "spec.json"
    path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    # A fresh home and no database: the plan needs no server and creates nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("FTJOBS_DATABASE_URL", "FTJOBS_REDIS_URL")}
    env["FTJOBS_HOME"] = str(tmp_path / "home")
    result = subprocess.run(
        [sys.executable, "-m", "ftjobs.cli", "plan", str(path), *options], capture_output=True, text=True, env=env
    )
    assert not (tmp_path / "home").exists()
    return result


def test_plan_that_fits_and_one_that_does_not_both_exit_0(tmp_path):
    fits = run_plan(
        tmp_path, {"base_model": "Qwen/Qwen2.5-0.5B", "method": "qlora", "resources": {"gpu_memory_gib": 80}}
    )
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["fits"] is True
    too_big = run_plan(
        tmp_path, {"base_model": "Qwen/Qwen2.5-7B", "method": "full", "resources": {"gpu_memory_gib": 1}}
    )
    assert too_big.returncode == 0, too_big.stderr
    plan = json.loads(too_big.stdout)
    assert plan["fits"] is False and plan["peak_vram_bytes"] > plan["gpu_memory_bytes"]


def test_invalid_spec_exits_2_with_a_problem(tmp_path):
    result = run_plan(tmp_path, {"base_model": "Qwen/Qwen2.5-0.5B", "methd": "qlora"}, "--json")
    assert result.returncode == 2
    assert json.loads(result.stderr)["code"] == "invalid_spec" and "methd" in result.stderr
    not_json = run_plan(tmp_path, "{not json", "--json")
    assert not_json.returncode == 2 and json.loads(not_json.stderr)["code"] == "invalid_spec"
    unknown_model = run_plan(tmp_path, {"base_model": "nobody/unknown-model"}, "--json")
    assert unknown_model.returncode == 2 and json.loads(unknown_model.stderr)["code"] == "base_model_not_found"
    # Without --json: one line for a person, whatever the number of errors.
    two_errors = run_plan(tmp_path, {"base_model": "Qwen/Qwen2.5-0.5B", "methd": "qlora", "lora": {"r": 0}})
    assert two_errors.returncode == 2 and two_errors.stderr.count("\n") == 1
    assert two_errors.stderr.startswith("ftjobs: invalid_spec: ") and "methd" in two_errors.stderr
    assert "lora.r" in two_errors.stderr


def test_no_server_exits_3_with_one_line_and_no_traceback(tmp_path):
    # Bound and never listening: connections are refused, and no other process can take the port meanwhile.
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"base_model": "Qwen/Qwen2.5-0.5B", "dataset": {"path": "x.jsonl"}}))
    dataset = tmp_path / "x.jsonl"
    dataset.write_text('{"text": "hi"}\n')
    env = {**os.environ, "FTJOBS_URL": f"http://127.0.0.1:{closed_port.getsockname()[1]}", "FTJOBS_API_KEY": "any"}
    for args in (
        ["jobs", "list"],
        ["status", "job_0123456789abcdef01234567"],
        ["submit", str(spec), "--watch"],
        ["files", "upload", str(dataset)],
        ["jobs", "download", "job_x"],
        ["jobs", "events", "job_x"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "ftjobs.cli", *args], capture_output=True, text=True, env=env, timeout=60
        )
        assert result.returncode == 3, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith("ftjobs: server_unreachable: cannot reach the ftjobs server at http://")
        assert result.stdout == ""
    closed_port.close()


def test_every_command_and_option_has_help_and_there_is_a_version():
    import argparse
    from importlib.metadata import version

    from ftjobs.cli import _parser

    def walk(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    assert helps.get(name), f"{path} {name} has no help"
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action

    actions = list(walk(_parser(), "ftjobs"))
    assert len(actions) > 40
    assert [(path, action.dest) for path, action in actions if not action.help] == []
    options: dict[str, set[str]] = {}
    for path, action in actions:
        options.setdefault(path, set()).update(action.option_strings)
    # The servers and the demo print logs and progress, not a result.
    servers = {"ftjobs up", "ftjobs api", "ftjobs worker", "ftjobs demo"}
    assert sorted(path for path in options if "--json" not in options[path] and path not in servers) == []
    assert {"ftjobs files delete", "ftjobs jobs download", "ftjobs submit", "ftjobs keys list"} <= set(options)
    result = subprocess.run([sys.executable, "-m", "ftjobs.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"ftjobs {version('ftjobs')}"


def test_keys_create_list_and_revoke(database):
    from service.db import transaction
    from service.errors import Unauthenticated
    from service.tenancy.keys import authenticate, presented_key_sha256

    def ftjobs(*args) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "ftjobs.cli", *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return result

    secret = ftjobs("keys", "create", "--tenant", "cli-team", "--max-active-jobs", "3").stdout.strip().splitlines()[-1]
    with transaction() as session:
        caller = authenticate(session.connection(), presented_key_sha256(f"Bearer {secret}"))
    assert not caller.admin and caller.key_id in ftjobs("keys", "list").stdout
    ftjobs("keys", "revoke", caller.key_id)
    with transaction() as session, pytest.raises(Unauthenticated):
        authenticate(session.connection(), presented_key_sha256(f"Bearer {secret}"))


def test_up_keeps_a_local_admin_key_readable_only_by_its_owner(settings, tmp_path):
    from ftjobs.cli import _ensure_local_admin_key
    from service.db import transaction
    from service.migrate import upgrade_database
    from service.tenancy.keys import authenticate, presented_key_sha256

    embedded = settings.model_copy(update={"database_url": None, "redis_url": None, "home": tmp_path})
    upgrade_database(embedded)
    _ensure_local_admin_key(embedded)
    key_file = embedded.api_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600
    secret = key_file.read_text().strip()
    _ensure_local_admin_key(embedded)  # a second start keeps the key
    assert key_file.read_text().strip() == secret
    with transaction(embedded) as session:
        assert authenticate(session.connection(), presented_key_sha256(f"Bearer {secret}")).admin
