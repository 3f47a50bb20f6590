"""Where a spec's base_model lives on disk, and its architecture for the planner.

Nothing is downloaded: a hub id resolves only from the local Hugging Face cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from planner import ModelShape
from planner.catalog import find_model
from service.errors import (BaseModelNotFound, InvalidSpec, ProblemError, UnsupportedArchitecture,
                            UnsupportedQuantization)


def resolve_base_model_dir(base_model: str) -> Path:
    """The local directory holding config.json and safetensors weights, or BaseModelNotFound."""
    candidate = Path(base_model).expanduser()
    if candidate.is_dir():
        directory = candidate.resolve()
    else:
        directory = _from_hub_cache(base_model)
    if not (directory / "config.json").is_file():
        raise BaseModelNotFound(f"{base_model!r} has no config.json")
    # Only safetensors: a pickled checkpoint could run code in the worker when loaded.
    if not any(directory.glob("*.safetensors")):
        raise BaseModelNotFound(f"{base_model!r} has no *.safetensors weights")
    return directory


def _from_hub_cache(base_model: str) -> Path:
    if base_model.count("/") != 1 or base_model.startswith(("/", ".", "~")):
        raise BaseModelNotFound(f"{base_model!r} is neither a local directory nor a hub id")
    cached = try_to_load_from_cache(base_model, "config.json")
    if not isinstance(cached, str):
        raise BaseModelNotFound(
            f"{base_model!r} is not in the local Hugging Face cache; nothing is downloaded at run time")
    return Path(cached).parent


def model_shape(base_model: str, config_path: Path | None) -> ModelShape:
    """The architecture: from config.json when one is on disk (it always wins over a catalog entry of the same
    name), else from the planner's catalog. A config the planner does not model is refused with its code."""
    if config_path is not None:
        config = json.loads(config_path.read_text())
        try:
            return ModelShape.from_config(config, name=base_model)
        except (KeyError, ValueError) as exc:
            raise _refusal(exc, base_model) from exc
    known = find_model(base_model)
    if known is None:
        raise BaseModelNotFound(f"{base_model!r} is not on this machine and not in the planner's catalog")
    return known


def _refusal(exc: Exception, base_model: str) -> ProblemError:
    error = {"unsupported_architecture": UnsupportedArchitecture,
             "unsupported_quantization": UnsupportedQuantization}.get(getattr(exc, "code", ""), InvalidSpec)
    return error(f"cannot plan for {base_model!r}: {exc}")


def planning_config(base_model: str) -> Path | None:
    """The config.json to plan from, weights or not (people download config.json alone to plan): a local
    directory's, else the local hub cache's; None sends the lookup to the catalog."""
    candidate = Path(base_model).expanduser()
    if candidate.is_dir():
        config = candidate.resolve() / "config.json"
        if not config.is_file():
            raise BaseModelNotFound(f"{base_model!r} has no config.json")
        return config
    try:
        return _from_hub_cache(base_model) / "config.json"
    except BaseModelNotFound:
        return None


def locate_for_planning(base_model: str) -> ModelShape:
    """Planning works offline and needs no weights: a config.json on disk, else a catalog entry. Submitting a job
    still resolves the weights (resolve_base_model_dir)."""
    return model_shape(base_model, planning_config(base_model))
