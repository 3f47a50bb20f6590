"""BAdam (Luo et al., 2024): block-coordinate Adam for full fine-tuning, from the badam package (1.4).

The model stays in bf16. One block of decoder layers at a time trains: badam's BlockOptimizer gives the active
block fp32 master copies, converts its bf16 gradients to fp32 at the step, runs the base optimizer (torch AdamW)
on the copies and writes them back; after `switch_every_steps` steps the next block takes over and the previous
block's masters and Adam states are dropped. Embeddings, lm_head and the final norm never train. The planner's
side is planner/optimizers.py (block_coordinate) and planner/methods.py method_traits.

BlockAdam adds what a service needs on top of badam 1.4:
  - every block trains exactly `switch_every_steps` steps (1.4 switches when `global_step + 1` is a multiple,
    after counting the step, so its first block gets one step fewer);
  - a state dict holding the active block, the order still to come, its fp32 masters and its Adam states, so a
    job resumed mid-block carries on in the same block from the same masters (1.4's is the base optimizer's);
  - no torch.cuda.empty_cache() after every step (1.4's), only at a switch, where a block's states are freed:
    the planner's fragmentation model assumes the caching allocator keeps its blocks between steps.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from badam import BlockOptimizer

from domain.spec import BadamOptions


def layer_blocks(parameter_names: list[str], layers_per_block: int) -> list[list[str]]:
    """The decoder layers' name prefixes ('model.layers.3.'), in layer order, `layers_per_block` consecutive layers
    to a block (the last may be shorter). The trailing dot keeps 'layers.1.' from matching 'layers.11.'."""
    prefixes: dict[int, str] = {}
    for name in parameter_names:
        if ".layers." in name:
            stack, rest = name.split(".layers.", 1)
            index = rest.split(".", 1)[0]
            prefixes[int(index)] = f"{stack}.layers.{index}."
    if not prefixes:
        raise ValueError("BAdam found no decoder layers ('<stack>.layers.<i>.' parameters) to cut into blocks")
    ordered = [prefixes[index] for index in sorted(prefixes)]
    return [ordered[start : start + layers_per_block] for start in range(0, len(ordered), layers_per_block)]


class BlockAdam(BlockOptimizer):
    def __init__(self, base_optimizer: torch.optim.Optimizer, model: torch.nn.Module, options: BadamOptions) -> None:
        named = list(model.named_parameters())
        super().__init__(
            base_optimizer,
            named,
            block_prefix_list=layer_blocks([name for name, _ in named], options.layers_per_block),
            switch_block_every=options.switch_every_steps,
            switch_mode=options.block_order,
            verbose=0,
        )
        # 1.4 aliases the base optimizer's state_dict onto the instance (for HF Trainer), hiding the method below.
        del self.state_dict

    @property
    def blocks(self) -> list[list[str]]:
        return self.block_prefix_list

    def switch_trainable_params(self, verbose: int | None = 0) -> None:
        self.active_block = self.current_block_idx  # 1.4 moves current_block_idx on to the next block
        super().switch_trainable_params(verbose)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous block's masters, grads and states are gone

    def step(self, closure=None) -> None:
        self.step_single_gpu()
        if self.global_step % self.switch_block_every == 0:
            self.switch_trainable_params()

    def trained_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every parameter some block trains: what a checkpoint must keep, whichever block is active."""
        prefixes = [prefix for block in self.block_prefix_list for prefix in block]
        return [(name, p) for name, p in self.named_parameters_list if any(prefix in name for prefix in prefixes)]

    def state_dict(self) -> dict:
        return {
            "base": self.base_optimizer.state_dict(),
            "masters": list(self.param_idx2hp.values()),
            "block": {
                "active": self.active_block,
                "next": self.current_block_idx,
                "order": list(getattr(self, "block_order", [])),  # random order: the blocks still to come
                "global_step": self.global_step,
                "lrs": [group["lr"] for group in self.param_groups],
            },
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Called after the trained weights are loaded: the active block's masters are re-created from them
        (badam's switch, without moving on), then overwritten with the saved fp32 ones, which the bf16 weights
        only round."""
        block = state_dict["block"]
        self.active_block, self.current_block_idx = block["active"], block["next"]
        self.block_order, self.global_step = list(block["order"]), block["global_step"]
        self.active_param_prefixs = self.block_prefix_list[self.active_block] + self.active_modules
        self._switch_trainable_params_single_gpu(verbose=0)
        self.base_optimizer.state = defaultdict(dict)
        with torch.no_grad():
            for master, saved in zip(self.param_idx2hp.values(), state_dict["masters"], strict=True):
                master.copy_(saved)
        self.base_optimizer.load_state_dict(state_dict["base"])
        for group, lr in zip(self.param_groups, block["lrs"], strict=True):
            group["lr"] = lr
