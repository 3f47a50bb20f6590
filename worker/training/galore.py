"""GaLore (galore-torch 1.0) with compact projection matrices.

galore-torch's GaLoreProjector keeps its projection as a slice of the SVD's U or Vh. For an fp32 gradient (fp32
trained weights: bf16-mixed, fp16-mixed, fp32) that slice is a view, which keeps the whole min(out, in)-wide
factor alive: about 7 GiB over Qwen2.5-7B's layers at rank 128. CompactGaLoreProjector copies the slice out.
The optimizers create a projector only for a param whose state has none (`if "projector" not in state`), so
installing ours up front is enough.
"""

from __future__ import annotations

from galore_torch.galore_projector import GaLoreProjector

SETTINGS = ("rank", "verbose", "update_proj_gap", "scale", "proj_type")


class CompactGaLoreProjector(GaLoreProjector):
    def get_orthogonal_matrix(self, weights, rank, type):
        matrix = super().get_orthogonal_matrix(weights, rank, type)
        if isinstance(matrix, list):  # proj_type "full": [U[:, :r], Vh[:r]]
            return [_own_storage(m) for m in matrix]
        return _own_storage(matrix)


def _own_storage(tensor):
    return tensor.clone() if tensor._base is not None else tensor


def install_projectors(optimizer) -> None:
    """Give every projected param (a group with `rank`) a compact projector, unless it already has one."""
    for group in optimizer.param_groups:
        if "rank" not in group:
            continue
        for parameter in group["params"]:
            state = optimizer.state[parameter]
            if "projector" not in state:
                state["projector"] = CompactGaLoreProjector(
                    group["rank"],
                    update_proj_gap=group["update_proj_gap"],
                    scale=group["scale"],
                    proj_type=group["proj_type"],
                )


def after_load(optimizer) -> None:
    """load_state_dict moves tensors, not the projection matrices inside the projector objects; and a param
    the checkpoint held no state for still needs a compact projector."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            projector = optimizer.state.get(parameter, {}).get("projector")
            if projector is None or projector.ortho_matrix is None:
                continue
            matrix = projector.ortho_matrix
            projector.ortho_matrix = (
                [m.to(parameter.device) for m in matrix] if isinstance(matrix, list) else matrix.to(parameter.device)
            )
    install_projectors(optimizer)
