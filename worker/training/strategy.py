"""How the model, its gradients and its optimizer are laid out over devices: the one seam between the recipe and
the hardware. The recipe does backward, the optimizer step, clipping, state dicts and saving only through a
strategy, so a sharded one (FSDP2: DTensor parameters, gathered state dicts) can stand behind the same calls.
SingleDeviceStrategy is the whole model on one device."""

from __future__ import annotations

from pathlib import Path

import torch

from domain.spec import JobSpec
from worker.training import checkpoint
from worker.training.methods import METHODS
from worker.training.optimizers import OPTIMIZERS


class SingleDeviceStrategy:
    def __init__(self, spec: JobSpec, model, optimizer, scaler: torch.amp.GradScaler | None) -> None:
        self.spec, self.model, self.optimizer, self.scaler = spec, model, optimizer, scaler
        self.optimizer_recipe = OPTIMIZERS[spec.memory.optimizer]
        # name -> parameter, everything the run changes (BAdam: every block's, whichever trains now)
        self.trained = dict(self.optimizer_recipe.trained(optimizer, model))

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters training now, whose gradients are clipped (BAdam: the active block's)."""
        return [parameter for parameter in self.trained.values() if parameter.requires_grad]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, max_grad_norm: float) -> None:
        """Clip, then one optimizer step; the gradients are zeroed after it."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        self.optimizer_recipe.clip(self.optimizer, self.parameters, max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step if the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ---- state: what a checkpoint saves and a resume loads ------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.trained)

    def load_trainable_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        trainable = self.trainable_state_dict()
        if trainable.keys() != saved.keys():
            raise ValueError("the checkpoint's trained parameters do not match the model's")
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(saved[name])

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        self.optimizer_recipe.load_state(self.optimizer, state_dict)

    def save_state(self, directory: Path) -> None:
        """The trained parameters and the optimizer state into a checkpoint directory (safetensors + JSON)."""
        checkpoint.save_tree(directory, "trainable", self.trainable_state_dict())
        checkpoint.save_tree(directory, "optimizer", self.optimizer_state_dict())

    def load_state(self, directory: Path) -> None:
        self.load_trainable_state_dict(checkpoint.load_tree(directory, "trainable"))
        self.load_optimizer_state_dict(checkpoint.load_tree(directory, "optimizer"))

    def export_adapter(self, target: Path) -> None:
        """A checkpoint's adapter/ (lora, qlora): what PeftModel.from_pretrained loads."""
        checkpoint.export_adapter(self.model, target)

    def scaler_state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state_dict(self, state_dict: dict | None) -> None:
        if self.scaler is not None and state_dict:
            self.scaler.load_state_dict(state_dict)

    def save_artifacts(self, plan, output_dir: Path) -> list[str]:
        """The trained model's files (adapter/ or model/), relative to output_dir."""
        return METHODS[self.spec.method].save_artifacts(self.spec, self.model, plan, output_dir)
