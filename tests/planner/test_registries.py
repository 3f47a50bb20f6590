"""The planner's registries: one entry per spec enum member, no more, and the terms read them, not method names."""

from __future__ import annotations

from domain.spec import JobSpec, Method, Optimizer
from planner import policy
from planner.catalog import find_model
from planner.core import WORKER, build_setup
from planner.methods import METHODS
from planner.optimizers import OPTIMIZERS
from planner.suggest import _candidates, sharding_patch

Q05 = find_model("Qwen/Qwen2.5-0.5B")


def spec(**body) -> JobSpec:
    return JobSpec.model_validate({"base_model": "Qwen/Qwen2.5-0.5B", **body})


def test_method_registry_covers_the_enum_exactly():
    assert set(METHODS) == set(Method)


def test_optimizer_registry_covers_the_enum_exactly():
    assert set(OPTIMIZERS) == set(Optimizer)


def test_optimizer_alternatives_are_registered_optimizers_other_than_the_entry():
    for optimizer, traits in OPTIMIZERS.items():
        assert optimizer not in traits.alternatives
        assert set(traits.alternatives) <= set(OPTIMIZERS)


def test_galore_entries_are_the_spec_galore_optimizers():
    assert {o for o, traits in OPTIMIZERS.items() if traits.galore} == {o for o in Optimizer if o.is_galore}


def test_setup_carries_the_entries_of_its_method_and_optimizer():
    s = build_setup(spec(method="full", memory={"optimizer": "adamw_4bit"}), Q05, 1, WORKER)
    assert s.traits is METHODS[Method.full] and s.optimizer_traits is OPTIMIZERS[Optimizer.adamw_4bit]


def test_unshardable_optimizers_are_swapped_for_adamw_in_a_sharding_patch():
    for optimizer, traits in OPTIMIZERS.items():
        body = {"method": "full", "memory": {"optimizer": optimizer.value}}
        patch = sharding_patch(spec(**body), 2, "zero2")
        assert ("memory" in patch) is (not traits.shards)


def test_optimizer_candidates_come_from_the_entry_alternatives():
    described = [d for _, d, _ in _candidates(spec(method="full", memory={"optimizer": "adamw"}), Q05, 1)]
    offered = [d.split("→")[1].split(" ")[0] for d in described if d.startswith("optimizer adamw→")]
    assert offered == [o.value for o in OPTIMIZERS[Optimizer.adamw].alternatives]


def test_worker_recipe_reads_the_policy():
    assert WORKER.fused_loss_default is policy.FUSED_LOSS_DEFAULT
    assert WORKER.expandable_segments is policy.expandable_segments(policy.ALLOCATOR_CONF)
