"""optuna, the one module that imports it: the study storage, and the request's search space, sampler and pruner
translated into optuna's objects. The driver (service/sweeps/driver.py) imports this only when a sweep is active.

The study lives in ftjobs' own database: on PostgreSQL in the schema `optuna` (created by migration 0010), so
optuna's tables and its own alembic_version never meet ours and go with the database; on the embedded SQLite
database, in a file of its own beside it, as SQLite has no schemas.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from service.models import Sweep, SweepTrial
from service.settings import Settings
from service.sweeps.request import Categorical, Dimension, IntRange, LogUniform, SweepRequest

log = logging.getLogger(__name__)
OPTUNA_SCHEMA = "optuna"  # migrations/versions/0010_sweeps.py creates it
# optuna's states for the rows' finished ones: what a row's outcome is told as.
TOLD_AS = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
ENQUEUED_ATTR = "ftjobs_enqueued"  # set once the request's enqueue_trials are in the study

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per study and trial would drown the worker's log


_STORAGES: dict[str, optuna.storages.RDBStorage] = {}  # one per database, kept by the process


def storage(settings: Settings) -> optuna.storages.RDBStorage:
    url = settings.sqlalchemy_url
    if url not in _STORAGES:
        _STORAGES[url] = _open_storage(url, settings)
    return _STORAGES[url]


def _open_storage(url: str, settings: Settings) -> optuna.storages.RDBStorage:
    if url.startswith("sqlite"):
        embedded = f"sqlite:///{settings.resolved_home / 'optuna.db'}"
        return optuna.storages.RDBStorage(embedded, engine_kwargs={"connect_args": {"timeout": 30}})
    # One connection kept, two more at a peak: every worker process holds its own, and PostgreSQL's 100 are shared.
    engine_kwargs = {
        "pool_size": 1,
        "max_overflow": 2,
        "pool_pre_ping": True,
        "connect_args": {"options": f"-csearch_path={OPTUNA_SCHEMA}"},
    }
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def forget_storages() -> None:
    """Close every storage this process opened: the next storage() opens it afresh, as after a restart."""
    for opened in _STORAGES.values():
        opened.engine.dispose()
    _STORAGES.clear()


def distributions(request: SweepRequest) -> dict[str, BaseDistribution]:
    return {path: _distribution(dimension) for path, dimension in request.search_space.items()}


def _distribution(dimension: Dimension) -> BaseDistribution:
    if isinstance(dimension, Categorical):
        return CategoricalDistribution(dimension.choices)
    if isinstance(dimension, IntRange):
        return IntDistribution(dimension.low, dimension.high, log=dimension.log)
    return FloatDistribution(dimension.low, dimension.high, log=isinstance(dimension, LogUniform))


def _sampler(request: SweepRequest, number: int) -> optuna.samplers.BaseSampler:
    """Seeded by the sweep's seed and the trial's number: any driver, before or after a restart, draws the same
    parameters for the same trial (a sampler's random state lives in its process, not in the study)."""
    seed = (request.sampler.seed or 0) + number
    if request.sampler.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(request: SweepRequest) -> optuna.pruners.BasePruner:
    options = request.pruner
    if options.type == "none":
        return optuna.pruners.NopPruner()
    steps = {"n_startup_trials": options.n_startup_trials, "n_warmup_steps": options.n_warmup_steps}
    if options.type == "percentile":
        return optuna.pruners.PercentilePruner(options.percentile, interval_steps=options.interval_steps, **steps)
    return optuna.pruners.MedianPruner(interval_steps=options.interval_steps, **steps)


@dataclass
class SweepStudy:
    """A sweep's optuna study, and its storage, through which a trial is found by its number."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage
    request: SweepRequest

    def trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)


def open_study(settings: Settings, sweep: Sweep, request: SweepRequest) -> SweepStudy:
    """The sweep's study, created on its first round with the request's enqueued configurations."""
    opened = storage(settings)
    study = optuna.create_study(
        storage=opened,
        study_name=sweep.study_name,
        direction=request.direction,
        pruner=_pruner(request),
        load_if_exists=True,
    )
    if not study.user_attrs.get(ENQUEUED_ATTR):
        for params in request.enqueue_trials:  # skip_if_exists: a round that died half-way left some in
            study.enqueue_trial(params, skip_if_exists=True)
        study.set_user_attr(ENQUEUED_ATTR, True)
    return SweepStudy(study, opened, request)


def asked_count(study: SweepStudy) -> int:
    """Trials asked so far: the enqueued ones wait until an ask takes them."""
    return sum(1 for trial in study.study.get_trials(deepcopy=False) if trial.state is not TrialState.WAITING)


def running(study: SweepStudy) -> dict[int, FrozenTrial]:
    trials = study.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return {trial.number: trial for trial in trials}


def ask(study: SweepStudy) -> tuple[int, dict[str, Any]]:
    """A new trial's number and parameters, every one drawn or taken from an enqueued configuration."""
    study.study.sampler = _sampler(study.request, asked_count(study))
    trial = study.study.ask(distributions(study.request))
    return trial.number, trial.params


def report(study: SweepStudy, number: int, points: Iterable[tuple[int, float]]) -> tuple[int, float] | None:
    """Report a running trial's intermediate values in order; the first (step, value) at which the pruner would
    have stopped it, or None. Point by point: a round that reads several steps at once judges each as it came."""
    trial = optuna.trial.Trial(study.study, study.trial_id(number))
    for step, value in points:
        trial.report(value, step)
        if trial.should_prune():
            return step, value
    return None


def tell_outcomes(study: SweepStudy, rows: Iterable[SweepTrial]) -> int:
    """Tell optuna each finished row's outcome it does not have yet (the rows are the truth); how many."""
    pending = running(study)
    told = 0
    for row in rows:
        state = TOLD_AS.get(row.state)
        if state is None or row.number not in pending:
            continue
        values: Any = row.value if state is TrialState.COMPLETE else None
        study.study.tell(row.number, values, state=state, skip_if_finished=True)
        told += 1
    return told


def tell_orphans_pruned(study: SweepStudy, known: set[int]) -> None:
    """Trials asked but never given a row (a cancelled sweep's last round): pruned, so none stays running."""
    for number in running(study):
        if number not in known:
            study.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
