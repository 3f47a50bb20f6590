"""The optimizer registry, worker side: one entry per spec Optimizer saying how to build it, clip the gradients it
reads, and load its checkpointed state. The static facts about each (CUDA-only, GaLore) are planner/optimizers.py;
tests/worker/test_worker_registries.py keeps both covering the enum. A new optimizer is one more entry here and there.

All are AdamW with betas (0.9, 0.999) and no weight decay (see worker/training/loading.py for the why)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from domain.spec import JobSpec, Optimizer
from planner import policy


def adamw_options(spec: JobSpec) -> dict:
    return {"lr": spec.training.learning_rate, "betas": (0.9, 0.999), "weight_decay": 0.0}


def clip_grad_norm(optimizer, parameters, max_norm: float) -> torch.Tensor:
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def load_plain(optimizer, state_dict: dict) -> None:
    optimizer.load_state_dict(state_dict)  # torch and bitsandbytes move the state to each parameter's device


def requires_grad(optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]


@dataclass(frozen=True, slots=True)
class OptimizerRecipe:
    build: Callable[[JobSpec, list, torch.device], torch.optim.Optimizer]  # (spec, params or groups, device)
    clip: Callable[..., torch.Tensor] = clip_grad_norm  # (optimizer, parameters, max_norm) -> total norm
    load_state: Callable[[object, dict], None] = load_plain  # (optimizer, a checkpoint's state dict)
    # (spec, model, the built optimizer) -> the optimizer that drives it over the model's blocks (BAdam)
    wrap: Callable[[JobSpec, torch.nn.Module, torch.optim.Optimizer], torch.optim.Optimizer] | None = None
    # (optimizer, model) -> every (name, param) the run changes: what a checkpoint keeps and the summary counts
    trained: Callable[[object, torch.nn.Module], list[tuple[str, torch.nn.Parameter]]] = requires_grad


# ---- build ------------------------------------------------------------------------------------------------------
def _torch_adamw(spec: JobSpec, parameters, device: torch.device):
    # The fused kernel is CUDA-only here; foreach is the fast path on the CPU.
    return torch.optim.AdamW(parameters, fused=device.type == "cuda", **adamw_options(spec))


def _adamw_4bit(spec: JobSpec, parameters, device: torch.device):
    from torchao.optim import AdamW4bit

    return AdamW4bit(parameters, **adamw_options(spec))


def _cpu_offload(spec: JobSpec, parameters, device: torch.device):
    from torchao.optim import CPUOffloadOptimizer

    return CPUOffloadOptimizer(
        parameters,
        torch.optim.AdamW,
        offload_gradients=policy.offload_gradients(spec),
        fused=True,
        **adamw_options(spec),
    )


def _bitsandbytes(class_name: str):
    def build(spec: JobSpec, parameters, device: torch.device):
        import bitsandbytes as bnb

        return getattr(bnb.optim, class_name)(parameters, **adamw_options(spec))

    return build


def _galore(eight_bit: bool):
    def build(spec: JobSpec, parameters, device: torch.device):
        from galore_torch import GaLoreAdamW, GaLoreAdamW8bit

        from worker.training import galore

        if eight_bit:
            optimizer = GaLoreAdamW8bit(parameters, **adamw_options(spec))
        else:
            optimizer = GaLoreAdamW(parameters, eps=1e-8, no_deprecation_warning=True, **adamw_options(spec))
        galore.install_projectors(optimizer)
        return optimizer

    return build


def _block_adam(spec: JobSpec, model: torch.nn.Module, base: torch.optim.Optimizer):
    from worker.training.badam import BlockAdam

    assert spec.badam_options is not None  # the badam optimizer always has its options
    return BlockAdam(base, model, spec.badam_options)


def _block_adam_trained(optimizer, model) -> list[tuple[str, torch.nn.Parameter]]:
    return optimizer.trained_named_parameters()  # every block's, not only the active one's


# ---- clip -------------------------------------------------------------------------------------------------------
def clip_offloaded(optimizer, parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over the gradients CPUOffloadOptimizer will read: the host copies of the offloaded params
    (their GPU grads may already be freed) plus the GPU grads of the small ones it keeps."""
    optimizer.stream.synchronize()  # the device->host grad copies run on the optimizer's side stream
    host = [p.grad for p in optimizer.param_d2h_map.values()]
    kept = [p.grad for group in optimizer.d_param_groups for p in group["params"] if p.grad is not None]
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32) for g in host]
    norms += [torch.linalg.vector_norm(g, dtype=torch.float32).cpu() for g in kept]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in host:
        g.mul_(factor)
    for g in kept:
        g.mul_(factor.to(g.device))
    return total


# ---- load a checkpoint's state ----------------------------------------------------------------------------------
def load_paged(optimizer, state_dict: dict) -> None:
    """bitsandbytes would copy paged states into ordinary device memory, which cannot be evicted to the host
    under pressure: keep them on the host and copy each into a fresh paged buffer, as init_state makes them."""
    optimizer.load_state_dict(state_dict, move_to_device=False)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key in ("state1", "state2"):
                if key in state and state[key].device != parameter.device:
                    buffer = optimizer.get_state_buffer(parameter, dtype=state[key].dtype)
                    buffer.copy_(state[key])
                    state[key] = buffer
    # The rest (qmap, absmax) moves to the device in the optimizer's first step (bitsandbytes' to_gpu).


def load_galore(optimizer, state_dict: dict) -> None:
    from worker.training import galore

    optimizer.load_state_dict(state_dict)
    galore.after_load(optimizer)


OPTIMIZERS: dict[Optimizer, OptimizerRecipe] = {
    Optimizer.adamw: OptimizerRecipe(_torch_adamw),
    Optimizer.adamw_8bit: OptimizerRecipe(_bitsandbytes("AdamW8bit")),
    Optimizer.paged_adamw_8bit: OptimizerRecipe(_bitsandbytes("PagedAdamW8bit"), load_state=load_paged),
    Optimizer.paged_adamw_32bit: OptimizerRecipe(_bitsandbytes("PagedAdamW32bit"), load_state=load_paged),
    Optimizer.adamw_4bit: OptimizerRecipe(_adamw_4bit),
    Optimizer.cpu_offload: OptimizerRecipe(_cpu_offload, clip=clip_offloaded),
    Optimizer.galore_adamw: OptimizerRecipe(_galore(eight_bit=False), load_state=load_galore),
    Optimizer.galore_adamw_8bit: OptimizerRecipe(_galore(eight_bit=True), load_state=load_galore),
    # torch AdamW is the base optimizer; BlockAdam hands it the active block's fp32 copies.
    Optimizer.badam: OptimizerRecipe(_torch_adamw, wrap=_block_adam, trained=_block_adam_trained),
}
