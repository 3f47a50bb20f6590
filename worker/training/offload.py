"""memory.offload_activations: what autograd saves in the forward for the backward waits in host memory instead
of on the accelerator, and comes back when its backward needs it. With gradient checkpointing that is each
checkpointed layer's input (non-reentrant checkpoint saves it through ctx.save_for_backward, so these hooks see
it; what a layer's recompute saves stays under the checkpoint's own inner hooks, on the device, one layer at a
time). Without checkpointing it is every saved tensor of every layer.

The model's own weights (and views of them: linear saves weight.t()) are never copied: they are on the device
anyway. This is torch.autograd.graph.save_on_cpu with that exception, which the torch one does not make (it would
copy every frozen weight to the host on every forward). The planner keeps one layer's saved tensors resident and
puts the rest in host memory (planner/terms.py resident_grad_layers); which jobs offload is the spec's fact."""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.graph import saved_tensors_hooks

# Tensors smaller than this stay where they are: copying a scalar or a mask row costs more than it frees.
MIN_OFFLOAD_BYTES = 1024


class ActivationOffload(saved_tensors_hooks):
    """A context for the forward pass. `offloaded_bytes` counts what went to the host in the last forward."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        weights = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
        pin = device.type == "cuda"
        self.offloaded_bytes = 0

        def pack(tensor: torch.Tensor):
            size = tensor.numel() * tensor.element_size()
            if size < MIN_OFFLOAD_BYTES or tensor.untyped_storage().data_ptr() in weights:
                return tensor
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
            host.copy_(tensor, non_blocking=pin)
            self.offloaded_bytes += size
            return tensor.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device_of_tensor, host = packed
            return host.to(device_of_tensor, non_blocking=pin)

        super().__init__(pack, unpack)

    def __enter__(self):
        self.offloaded_bytes = 0
        return super().__enter__()


def activation_offload(model, device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return ActivationOffload(model, device) if enabled else contextlib.nullcontext()
