"""`ftjobs sweeps create|get|cancel`: hyperparameter sweeps (POST /v1/sweeps)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ftjobs.client import Sweep
from ftjobs.commands.common import JOB_DID_NOT_SUCCEED, SUCCEEDED, client_of, emit, table, when
from ftjobs.commands.jobs import read_spec


def register(commands, parent: argparse.ArgumentParser) -> None:
    sweeps = commands.add_parser(
        "sweeps",
        help="hyperparameter sweeps: trials planned before they are queued, poor ones pruned early",
        description="Sweeps of the caller's tenant (optuna drives them; every trial is a job).",
    )
    actions = sweeps.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser("create", parents=[parent], help="start a sweep from a request (a JSON file)")
    create.add_argument(
        "--file", "-f", type=Path, required=True, help="the request: spec, search_space, n_trials, parallelism, ..."
    )
    create.set_defaults(run=_create)
    get = actions.add_parser("get", parents=[parent], help="a sweep's trials and its best; exit 1 if it failed")
    get.add_argument("sweep_id", help="the sweep's id (swp_...)")
    get.set_defaults(run=_get)
    cancel = actions.add_parser("cancel", parents=[parent], help="cancel a sweep and its running trials")
    cancel.add_argument("sweep_id", help="the sweep's id (swp_...)")
    cancel.set_defaults(run=_cancel)


def _create(args) -> int:
    sweep = client_of(args).create_sweep(read_spec(args.file))
    emit(args, sweep, f"created {sweep.id} ({sweep.status}, {sweep.n_trials} trials, {sweep.parallelism} at once)")
    return SUCCEEDED


def _get(args) -> int:
    sweep = client_of(args).sweep(args.sweep_id)
    emit(args, sweep, describe(sweep))
    return JOB_DID_NOT_SUCCEED if sweep.status in ("failed", "cancelled") else SUCCEEDED


def _cancel(args) -> int:
    sweep = client_of(args).cancel_sweep(args.sweep_id)
    emit(args, sweep, f"{sweep.id} {sweep.status}")
    return SUCCEEDED


def describe(sweep: Sweep) -> str:
    lines = [
        f"id        {sweep.id}",
        f"status    {sweep.status}",
        f"metric    {sweep.metric} ({sweep.direction})",
        f"trials    {len(sweep.trials)}/{sweep.n_trials}, {sweep.parallelism} at once",
        f"created   {when(sweep.created_at)}",
        f"finished  {when(sweep.finished_at) or '-'}",
    ]
    if sweep.best_trial is not None:
        lines.append(
            f"best      trial {sweep.best_trial.number}: {sweep.best_trial.value:.4f} {sweep.best_trial.params}"
        )
    rows = [
        [
            t.number,
            t.state,
            t.job_id,
            None if t.value is None else f"{t.value:.4f}",
            None if t.predicted_peak_bytes is None else f"{t.predicted_peak_bytes / 1024**3:.2f}",
            " ".join(f"{name}={value}" for name, value in t.params.items()),
            t.pruned_reason,
        ]
        for t in sweep.trials
    ]
    return "\n".join(lines) + "\n\n" + table(["#", "STATE", "JOB", "VALUE", "PEAK_GIB", "PARAMS", "PRUNED"], rows)
