"""POST /v1/sweeps' body: a base spec, a search space over its dotted paths, and how optuna searches it. Every
problem with the request is reported at once, as the job spec's are; a trial's own configuration is checked when
it is built (trial_spec), and one that is invalid is pruned with the reason, never run."""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from domain.spec import MAX_STEPS, JobSpec

MAX_TRIALS = 200
MAX_PARALLELISM = 32
MAX_SEED = 2**31 - 1
# What the metric is read from in a job's progress (worker/training/recipe.py `report`).
PROGRESS_KEY = {"eval_loss": "eval_loss", "train_loss": "loss"}

ParamPath = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$", max_length=128)]
Choice = Annotated[str, StringConstraints(max_length=256)] | bool | int | float
Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogUniform(_Strict):
    type: Literal["log_uniform"]
    low: Finite = Field(gt=0)
    high: Finite = Field(gt=0)


class Uniform(_Strict):
    type: Literal["uniform"]
    low: Finite
    high: Finite


class IntRange(_Strict):
    type: Literal["int"]
    low: int = Field(ge=-(2**31), le=2**31)
    high: int = Field(ge=-(2**31), le=2**31)
    log: bool = False


class Categorical(_Strict):
    type: Literal["categorical"]
    choices: list[Choice] = Field(min_length=1, max_length=64)


Dimension = Annotated[LogUniform | Uniform | IntRange | Categorical, Field(discriminator="type")]


class SamplerOptions(_Strict):
    type: Literal["tpe", "random"] = "tpe"
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="None: one is drawn when the sweep is created")


class PrunerOptions(_Strict):
    """optuna's MedianPruner / PercentilePruner arguments; 'none' never stops a trial early."""

    type: Literal["median", "percentile", "none"] = "median"
    n_startup_trials: int = Field(5, ge=0, le=MAX_TRIALS, description="No pruning until this many trials complete")
    n_warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="No pruning of a trial before this step")
    interval_steps: int = Field(1, ge=1, le=MAX_STEPS)
    percentile: float = Field(50.0, ge=0, le=100, description="'percentile': keep the best this-percent")


class SweepRequest(_Strict):
    spec: JobSpec = Field(description="The base spec every trial starts from")
    search_space: dict[ParamPath, Dimension] = Field(
        min_length=1, max_length=16, description="Dotted paths of the spec (training.learning_rate, lora.r, ...)"
    )
    n_trials: int = Field(ge=1, le=MAX_TRIALS)
    parallelism: int = Field(1, ge=1, le=MAX_PARALLELISM, description="Trials whose jobs are active at once")
    metric: Literal["eval_loss", "train_loss"] = Field("eval_loss", description="eval_loss needs a validation set")
    direction: Literal["minimize", "maximize"] = "minimize"
    sampler: SamplerOptions = SamplerOptions()
    pruner: PrunerOptions = PrunerOptions()
    enqueue_trials: list[dict[ParamPath, Choice]] = Field(
        default_factory=list, max_length=MAX_TRIALS, description="Configurations to try first (optuna enqueue_trial)"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SweepRequest:
        problems = [problem for path, dim in self.search_space.items() for problem in _dimension_problems(path, dim)]
        if self.parallelism > self.n_trials:
            problems.append(f"parallelism {self.parallelism} exceeds n_trials {self.n_trials}")
        if len(self.enqueue_trials) > self.n_trials:
            problems.append(f"{len(self.enqueue_trials)} enqueue_trials exceed n_trials {self.n_trials}")
        problems += [problem for params in self.enqueue_trials for problem in self._enqueued_problems(params)]
        if self.spec.dataset is None:
            problems.append("spec.dataset: a sweep's trials are jobs, which need a dataset")
        if self.metric == "eval_loss" and not self._has_validation_set():
            problems.append(
                "metric eval_loss needs a validation set: give spec.validation_dataset or "
                "spec.training.validation_fraction"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _has_validation_set(self) -> bool:
        return (
            self.spec.validation_dataset is not None
            or self.spec.training.validation_fraction is not None
            or "training.validation_fraction" in self.search_space
        )

    def _enqueued_problems(self, params: dict[str, Any]) -> list[str]:
        problems = []
        for path, value in params.items():
            dimension = self.search_space.get(path)
            if dimension is None:
                problems.append(f"enqueue_trials: {path} is not in the search space")
            elif not _contains(dimension, value):
                where = "among its choices" if isinstance(dimension, Categorical) else "within its low and high"
                problems.append(f"enqueue_trials: {path} {value!r} is not {where}")
        return problems


def _dimension_problems(path: str, dimension: Dimension) -> list[str]:
    problems = [f"search_space: {p}" for p in _path_problems(path)]
    if isinstance(dimension, LogUniform | Uniform | IntRange) and not dimension.low < dimension.high:
        problems.append(f"search_space.{path}: low {dimension.low} must be below high {dimension.high}")
    if isinstance(dimension, IntRange) and dimension.log and dimension.low < 1:
        problems.append(f"search_space.{path}: a log int range starts at 1 or more")
    if isinstance(dimension, Categorical) and len({repr(c) for c in dimension.choices}) < len(dimension.choices):
        problems.append(f"search_space.{path}: choices repeat")
    return problems


def _path_problems(path: str) -> list[str]:
    """A path is valid if it names a value (not a section) of JobSpec, through its nested option models."""
    model: type[BaseModel] = JobSpec
    parts = path.split(".")
    for depth, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return [f"{path}: {'.'.join(parts[: depth + 1])} is not a field of the job spec"]
        nested = _model_in(field.annotation)
        last = depth == len(parts) - 1
        if last and nested is not None:
            return [f"{path} is a section of the spec; name one of its fields"]
        if not last and nested is None:
            return [f"{path}: {'.'.join(parts[: depth + 1])} holds a value, not fields"]
        model = nested or model
    return []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if inspect.isclass(candidate) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _contains(dimension: Dimension, value: Any) -> bool:
    if isinstance(dimension, Categorical):
        return any(type(value) is type(choice) and value == choice for choice in dimension.choices)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dimension, IntRange) and not isinstance(value, int):
        return False
    return dimension.low <= value <= dimension.high


class InvalidTrial(Exception):
    """The base spec with this trial's parameters is not a valid job spec."""


def trial_spec(base: JobSpec, params: dict[str, Any], sweep_id: str, number: int) -> JobSpec:
    """The base spec with each parameter set at its dotted path, tagged with its sweep and trial in metadata."""
    spec = base.model_dump(mode="json", exclude_unset=True)
    for path, value in params.items():
        *sections, name = path.split(".")
        node = spec
        for section in sections:
            if not isinstance(node.get(section), dict):  # an unset or null section: the trial sets it
                node[section] = {}
            node = node[section]
        node[name] = value
    spec["metadata"] = {**spec.get("metadata", {}), "ftjobs_sweep": sweep_id, "ftjobs_sweep_trial": str(number)}
    try:
        return JobSpec.model_validate(spec)
    except ValidationError as error:
        messages = [f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()]
        raise InvalidTrial("; ".join(messages)) from None
