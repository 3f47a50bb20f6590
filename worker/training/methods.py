"""The method registry, worker side: one entry per spec Method saying how the loaded base becomes the model that
trains (lora/qlora: peft adapters; freeze: chosen layers or modules; full: as loaded) and what its artifacts are
(adapter/ or model/). The trainable parameters are whatever `prepare` leaves requires_grad; checkpoints save those
(checkpoint.py), plus peft's adapter/ where planner/methods.py says the method trains adapters. The static facts
are planner/methods.py; tests/worker/test_worker_registries.py keeps both covering the enum."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from domain.spec import JobSpec, Method
from planner import policy
from worker.training import extras


@dataclass(frozen=True, slots=True)
class MethodRecipe:
    prepare: Callable  # (spec, loaded base model, precision plan) -> the model that trains
    # (spec, model, plan, output_dir, save_dir=extras.save_dir) -> files written, output_dir-relative; a sharded
    # strategy passes a save_dir that writes the consolidated state dict
    save_artifacts: Callable[..., list[str]]


def _prepare_adapters(spec: JobSpec, model, plan):
    from peft import get_peft_model

    if spec.memory.gradient_checkpointing:
        # The frozen embeddings produce no grad-requiring tensor; adapters further up still need one.
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(spec))  # freezes the base, adds fp32 adapters
    if spec.lora_options.init == "pissa":
        _keep_pissa_initial_adapter(model)
    return model


def _prepare_freeze(spec: JobSpec, model, plan):
    if spec.freeze_options.trainable_modules is not None:
        _train_named_modules(model, spec.freeze_options.trainable_modules, plan.trained_dtype)
    else:
        _train_last_layers(model, spec.freeze_options.trainable_layers, plan.trained_dtype)
    return model


def _prepare_full(spec: JobSpec, model, plan):
    return model  # every weight trains, already in the trained dtype


def _save_adapter(spec: JobSpec, model, plan, output_dir: Path, save_dir=extras.save_dir) -> list[str]:
    return extras.save_adapter(spec, model, output_dir, save_dir)


def _save_model(spec: JobSpec, model, plan, output_dir: Path, save_dir=extras.save_dir) -> list[str]:
    return save_dir(model, output_dir, "model")


def _save_freeze(spec: JobSpec, model, plan, output_dir: Path, save_dir=extras.save_dir) -> list[str]:
    model.to(plan.frozen_dtype)  # one dtype per checkpoint: the trained layers go back to the frozen layers' dtype
    return save_dir(model, output_dir, "model")


METHODS: dict[Method, MethodRecipe] = {
    Method.qlora: MethodRecipe(_prepare_adapters, _save_adapter),
    Method.lora: MethodRecipe(_prepare_adapters, _save_adapter),
    Method.full: MethodRecipe(_prepare_full, _save_model),
    Method.freeze: MethodRecipe(_prepare_freeze, _save_freeze),
}


def lora_config(spec: JobSpec):
    from peft import LoraConfig

    options = spec.lora_options
    return LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        # peft's "all-linear" already leaves the output layer (lm_head) out.
        target_modules=options.target_modules,
        use_dora=options.use_dora,
        use_rslora=options.use_rslora,
        init_lora_weights="pissa" if options.init == "pissa" else True,
        bias="none",
        task_type="CAUSAL_LM",
    )


def decoder_layers(model) -> torch.nn.ModuleList:
    """The stack of decoder blocks: the ModuleList as long as config.num_hidden_layers."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def _train_last_layers(model, trainable_layers: int, trained_dtype: torch.dtype) -> None:
    layers = decoder_layers(model)
    if trainable_layers > len(layers):
        raise ValueError(
            f"freeze.trainable_layers is {trainable_layers} but the model has {len(layers)} decoder layers"
        )
    model.requires_grad_(False)
    for layer in layers[len(layers) - trainable_layers :]:
        # Only the layers that train get fp32 master weights under mixed precision; the rest stay in half.
        layer.to(trained_dtype)
        layer.requires_grad_(True)


def _train_named_modules(model, names: list[str], trained_dtype: torch.dtype) -> None:
    """freeze.trainable_modules: exactly the parameters under the named modules train. A tied lm_head shares
    the embedding matrix, so naming either trains both."""
    model.requires_grad_(False)
    matched = {name: False for name in names}
    for parameter_name, parameter in model.named_parameters(remove_duplicate=False):  # tied lm_head too
        hits = [name for name in names if policy.module_name_matches(parameter_name, name)]
        for name in hits:
            matched[name] = True
        if hits:
            parameter.data = parameter.data.to(trained_dtype)  # fp32 master weights under -mixed
            parameter.requires_grad_(True)
    missing = [name for name, hit in matched.items() if not hit]
    if missing:
        raise ValueError(f"freeze.trainable_modules {missing} match no parameter of {type(model).__name__}")


def _keep_pissa_initial_adapter(model) -> None:
    """PiSSA moves the top singular directions out of the base weights into the adapter, so the trained adapter
    only fits that residual base. Keep the initial adapter so saving can convert the result into an ordinary LoRA
    adapter of the original base (peft: save_pretrained(path_initial_model_for_weight_conversion=...))."""
    import tempfile

    initial = Path(tempfile.mkdtemp(prefix="ftjobs-pissa-init-"))
    config = model.peft_config["default"]
    config.init_lora_weights = True  # peft requires this flag on the saved initial adapter
    model.save_pretrained(initial)
    config.init_lora_weights = "pissa"
    model.ftjobs_pissa_initial = initial
