"""The worker's torch objects obey planner/policy.py: the facts the planner predicts memory from are the ones the
worker trains with (dtypes, the loss's chunk size, the cpu_offload gradient rule, module matching, GaLore)."""

from __future__ import annotations

import os
import re
import sys
import types

import pytest
import torch

from domain.spec import Precision
from planner import policy
from worker.training import loading, loss
from worker.training.optimizers import OPTIMIZERS

CPU = torch.device("cpu")


@pytest.mark.parametrize("precision", list(Precision))
def test_precision_plan_dtypes_are_the_policys(precision):
    rule, plan = policy.PRECISIONS[precision], loading.precision_plan(precision)
    assert plan.frozen_dtype is getattr(torch, rule.frozen_dtype)
    assert plan.trained_dtype is getattr(torch, rule.trained_dtype)
    assert plan.autocast_dtype is (getattr(torch, rule.autocast_dtype) if rule.autocast_dtype else None)
    assert plan.grad_scaler is rule.grad_scaler
    assert plan.frozen_dtype.itemsize == rule.frozen_bytes and plan.trained_dtype.itemsize == rule.trained_bytes


def test_every_precision_has_a_plan():
    assert set(policy.PRECISIONS) == set(Precision)


def test_fused_loss_runs_lm_head_in_chunks_of_the_policys_size(make_spec, tiny_llama, monkeypatch):
    """2 x 700 learned positions: the chunks are exactly FUSED_CHUNK_TOKENS long, then the rest."""
    spec = make_spec("full", memory={"precision": "fp32"})
    model = loading.load_model(spec, tiny_llama, CPU, loading.precision_plan(spec.memory.precision))
    sizes: list[int] = []
    real_checkpoint = loss.checkpoint

    def recording_checkpoint(function, hidden, targets, **kwargs):
        sizes.append(hidden.size(0))
        return real_checkpoint(function, hidden, targets, **kwargs)

    monkeypatch.setattr(loss, "checkpoint", recording_checkpoint)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 701))
    loss.loss_sum(model, {"input_ids": input_ids, "labels": input_ids.clone()}, fused=True)
    learned = 2 * 700
    chunk = policy.FUSED_CHUNK_TOKENS
    assert sizes == [chunk] * (learned // chunk) + ([learned % chunk] if learned % chunk else [])


@pytest.mark.parametrize("fused_loss", [None, True, False])
def test_fused_loss_default_is_the_policys(make_spec, fused_loss):
    spec = make_spec("lora", memory={"fused_loss": fused_loss})
    expected = policy.FUSED_LOSS_DEFAULT if fused_loss is None else fused_loss
    assert policy.fused_loss_enabled(spec) is expected


@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_cpu_offload_frees_gpu_gradients_as_the_policy_says(make_spec, monkeypatch, accumulation):
    """CPUOffloadOptimizer needs CUDA; what the worker asks of it is recorded by a stand-in."""
    received: dict = {}

    def recording_offload_optimizer(params, optimizer_class, **kwargs):
        received.update(kwargs, optimizer_class=optimizer_class)
        return "built"

    monkeypatch.setitem(
        sys.modules, "torchao.optim", types.SimpleNamespace(CPUOffloadOptimizer=recording_offload_optimizer)
    )
    spec = make_spec(
        "lora", memory={"optimizer": "cpu_offload"}, training={"gradient_accumulation_steps": accumulation}
    )
    assert OPTIMIZERS[spec.memory.optimizer].build(spec, [torch.nn.Parameter(torch.zeros(4))], CPU) == "built"
    assert received["offload_gradients"] is policy.offload_gradients(spec)
    assert received["offload_gradients"] is (accumulation == 1)


@pytest.mark.parametrize("modules", [["mlp"], ["layers.1"], ["self_attn", "embed_tokens"], ["layers.0.mlp"]])
def test_freeze_trains_exactly_the_parameters_the_policy_matches(make_spec, tiny_llama, modules):
    spec = make_spec("freeze", freeze={"trainable_modules": modules})
    model = loading.load_model(spec, tiny_llama, CPU, loading.precision_plan(spec.memory.precision))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {
        name for name, _ in model.named_parameters() if any(policy.module_name_matches(name, m) for m in modules)
    }
    assert trained == expected and trained


def test_galore_projects_exactly_the_parameters_the_policy_selects(make_spec, tiny_llama):
    spec = make_spec("full", memory={"optimizer": "galore_adamw"}, galore={"rank": 8})
    model = loading.load_model(spec, tiny_llama, CPU, loading.precision_plan(spec.memory.precision))
    projected, plain = loading.parameter_groups(spec, model)
    names = {id(p): name for name, p in model.named_parameters()}
    expected = {name for name, p in model.named_parameters() if policy.galore_projects(name, p.ndim)}
    assert {names[id(p)] for p in projected["params"]} == expected and expected
    assert not {names[id(p)] for p in plain["params"]} & expected


def test_cuda_only_optimizers_are_the_planners(make_spec):
    from domain.errors import UnsupportedOnDevice
    from planner.optimizers import OPTIMIZERS as TRAITS

    for choice, traits in TRAITS.items():
        spec = make_spec("full", memory={"optimizer": choice.value})
        if traits.cuda_only:
            with pytest.raises(UnsupportedOnDevice, match=re.escape(traits.cuda_only)):
                loading.check_device_support(spec, CPU)
        else:
            loading.check_device_support(spec, CPU)


def test_the_training_process_sets_the_policys_allocator(monkeypatch):
    from worker.job_process import _configure_allocator

    monkeypatch.delenv(policy.ALLOCATOR_ENV, raising=False)
    assert _configure_allocator() is None
    assert os.environ[policy.ALLOCATOR_ENV] == policy.ALLOCATOR_CONF


def test_an_operators_allocator_setting_is_kept_and_the_job_is_told(monkeypatch):
    from worker.job_process import _configure_allocator

    monkeypatch.setenv(policy.ALLOCATOR_ENV, "backend:cudaMallocAsync")
    note = _configure_allocator()
    assert os.environ[policy.ALLOCATOR_ENV] == "backend:cudaMallocAsync"
    assert policy.ALLOCATOR_CONF in note and "backend:cudaMallocAsync" in note
