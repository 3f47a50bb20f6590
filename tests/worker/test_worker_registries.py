"""Each worker registry has one entry per spec enum value, as its planner side does."""

from __future__ import annotations

from domain.spec import Method, Optimizer
from planner.methods import METHODS as METHOD_TRAITS
from planner.optimizers import OPTIMIZERS as OPTIMIZER_TRAITS
from worker.training.methods import METHODS
from worker.training.optimizers import OPTIMIZERS


def test_the_optimizer_registry_covers_the_enum():
    assert set(OPTIMIZERS) == set(Optimizer) == set(OPTIMIZER_TRAITS)


def test_the_method_registry_covers_the_enum():
    assert set(METHODS) == set(Method) == set(METHOD_TRAITS)


def test_every_entry_is_complete():
    for entry in OPTIMIZERS.values():
        assert callable(entry.build) and callable(entry.clip) and callable(entry.load_state)
    for entry in METHODS.values():
        assert callable(entry.prepare) and callable(entry.save_artifacts)
