"""memory.liger_kernels: liger-kernel's Triton kernels on CUDA. The model's RMSNorm, SwiGLU/GeGLU MLP and
RoPE are patched on the instance (before peft wraps it), and the fused loss runs Liger's fused linear
cross-entropy instead of the chunked one in worker/training/loss.py. Which jobs get them is
planner.policy.liger_kernels_enabled, the fact the planner's terms read too.

Liger's kernels are Triton, so they need a GPU: elsewhere the model keeps transformers' modules and the chunked
loss runs, and the worker logs why."""

from __future__ import annotations

import logging

import torch

from domain.spec import JobSpec
from planner import policy

log = logging.getLogger(__name__)
# Set on the transformers model that got the kernels: its fused loss is Liger's (worker/training/loss.py).
LIGER_LOSS = "ftjobs_liger_loss"


def liger_applies(spec: JobSpec, model_type: str, device: torch.device) -> bool:
    """The policy, and a device Liger's kernels run on; says why it does not run where it was asked for."""
    if not policy.liger_kernels_enabled(spec, model_type):
        return False
    if device.type != "cuda":
        log.info("memory.liger_kernels: skipped on %s (Triton kernels need CUDA); the chunked loss runs", device)
        return False
    return True


def apply_liger(model) -> None:
    """Patch this model instance's modules, keeping transformers' own loss path out (the recipe computes the loss)."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False,
        fused_linear_cross_entropy=False,
    )  # fmt: skip
    setattr(model, LIGER_LOSS, True)


def has_liger_loss(model) -> bool:
    """Whether this model (peft-wrapped or not) got Liger: its loss is then the fused one whatever
    memory.fused_loss says, as the planner plans it."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(causal_lm, LIGER_LOSS, False))


def liger_loss_sum(
    causal_lm, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "sum"
) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy over the learned positions (summed, or per position with "none"), or
    None for a model without it."""
    if not getattr(causal_lm, LIGER_LOSS, False):
        return None
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    lm_head = causal_lm.get_output_embeddings()
    return LigerFusedLinearCrossEntropyLoss(reduction=reduction)(lm_head.weight, hidden, targets, lm_head.bias)
