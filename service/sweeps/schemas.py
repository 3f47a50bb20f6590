"""What GET /v1/sweeps/{id} answers: the sweep, each trial and what became of it, and the best trial so far; and
GET /v1/sweeps, a page of sweeps with their trials counted by state."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from service.models import Sweep, SweepTrial


class SweepTrialOut(BaseModel):
    number: int = Field(description="optuna's trial number")
    state: Literal["queued", "running", "complete", "pruned", "failed"]
    job_id: str | None = Field(description="The trial's job; null when it was pruned before queueing")
    params: dict[str, Any]
    value: float | None = Field(description="The metric at the job's end (complete trials)")
    predicted_peak_bytes: int | None = Field(description="The planner's peak for this configuration")
    pruned_reason: str | None

    @classmethod
    def of(cls, trial: SweepTrial) -> SweepTrialOut:
        return cls(
            number=trial.number,
            state=trial.state,  # type: ignore[arg-type]
            job_id=trial.job_id,
            params=trial.params,
            value=trial.value,
            predicted_peak_bytes=trial.predicted_peak_bytes,
            pruned_reason=trial.pruned_reason,
        )


class SweepFields(BaseModel):
    """What a sweep is shown with, in the list and alone."""

    id: str
    status: Literal["running", "cancelling", "succeeded", "cancelled", "failed"]
    metric: str
    direction: Literal["minimize", "maximize"]
    n_trials: int
    parallelism: int
    created_at: datetime
    finished_at: datetime | None

    @staticmethod
    def fields_of(sweep: Sweep) -> dict[str, Any]:
        request = sweep.request
        return {
            "id": sweep.id,
            "status": sweep.status,
            "metric": request.get("metric", "eval_loss"),
            "direction": request.get("direction", "minimize"),
            "n_trials": request["n_trials"],
            "parallelism": request.get("parallelism", 1),
            "created_at": sweep.created_at,
            "finished_at": sweep.finished_at,
        }


class SweepOut(SweepFields):
    request: dict[str, Any] = Field(description="The request as given, with the sampler's seed filled in")
    trials: list[SweepTrialOut]
    best_trial: SweepTrialOut | None = Field(description="The complete trial with the best value so far")

    @classmethod
    def of(cls, found: tuple[Sweep, list[SweepTrial]]) -> SweepOut:
        sweep, trials = found
        fields = cls.fields_of(sweep)
        complete = [trial for trial in trials if trial.state == "complete" and trial.value is not None]
        pick = min if fields["direction"] == "minimize" else max
        best = pick(complete, key=lambda trial: trial.value) if complete else None
        return cls(
            **fields,
            request=sweep.request,
            trials=[SweepTrialOut.of(trial) for trial in trials],
            best_trial=SweepTrialOut.of(best) if best else None,
        )


class SweepSummary(SweepFields):
    trials_by_state: dict[str, int] = Field(description="How many trials are queued, running, complete, pruned, failed")

    @classmethod
    def of(cls, sweep: Sweep, counts: dict[str, int]) -> SweepSummary:
        return cls(**cls.fields_of(sweep), trials_by_state=counts)


class SweepPage(BaseModel):
    data: list[SweepSummary] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last page")

    @classmethod
    def of(cls, found: tuple[list[Sweep], dict[str, dict[str, int]], bool]) -> SweepPage:
        page, counts, more = found
        return cls(
            data=[SweepSummary.of(sweep, counts[sweep.id]) for sweep in page],
            next_cursor=page[-1].id if more else None,
        )
