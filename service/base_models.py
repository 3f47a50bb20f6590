"""Where a spec's base_model lives on disk, and its architecture for the planner.

Nothing is downloaded: a hub id resolves only from the local Hugging Face cache.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from planner import ModelShape
from planner.catalog import find_model
from service.errors import BaseModelNotFound, InvalidSpec


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


def model_shape(base_model: str, directory: Path | None) -> ModelShape:
    """The architecture: from config.json when the model is on disk, else from the planner's catalog."""
    if directory is not None:
        config = json.loads((directory / "config.json").read_text())
        try:
            return ModelShape.from_config(config, name=base_model)
        except (KeyError, ValueError) as exc:
            raise InvalidSpec(f"cannot plan for {base_model!r}: unsupported config.json ({exc})") from exc
    known = find_model(base_model)
    if known is None:
        raise BaseModelNotFound(f"{base_model!r} is not on this machine and not in the planner's catalog")
    return known


def locate_for_planning(base_model: str) -> ModelShape:
    """Planning works offline: a model on disk, else a catalog entry."""
    try:
        directory = resolve_base_model_dir(base_model)
    except BaseModelNotFound:
        directory = None
    return model_shape(base_model, directory)
