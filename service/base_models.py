"""Where a spec's base_model lives on disk, and its architecture for the planner.

The API reads a model only inside the configured model roots (FTJOBS_MODEL_ROOTS) or the local Hugging Face
cache: anything else is refused before a byte of it is read, whether it exists or not, so a client can neither
train on an arbitrary server directory nor probe the filesystem. `ftjobs plan` on the command line is the
operator's own tool and passes `model_roots=None` to plan any local path. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from planner import ModelShape
from planner.catalog import find_model
from service.errors import BaseModelNotAllowed, BaseModelNotFound, InvalidSpec

# config.json keys that carry the longest sequence a model was built for, by architecture family.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def resolve_base_model_dir(base_model: str, model_roots: list[Path] | None) -> Path:
    """The directory holding config.json and safetensors weights; BaseModelNotAllowed or BaseModelNotFound."""
    if model_roots is None:
        candidate = Path(base_model).expanduser()
        directory = candidate.resolve() if candidate.is_dir() else _from_hub_cache(base_model)
    else:
        directory = _inside_roots(base_model, model_roots)
    if not (directory / "config.json").is_file():
        raise BaseModelNotFound(f"{base_model!r} has no config.json")
    # Only safetensors: a pickled checkpoint could run code in the worker when loaded.
    if not any(directory.glob("*.safetensors")):
        raise BaseModelNotFound(f"{base_model!r} has no *.safetensors weights")
    return directory


def _inside_roots(base_model: str, roots: list[Path]) -> Path:
    name = PurePosixPath(base_model)
    # Decided from the string alone: no filesystem call happens for a name that could leave the roots.
    if (base_model.startswith("~") or ".." in name.parts or "\\" in base_model
            or any(not ch.isprintable() for ch in base_model)):
        raise _not_allowed(base_model)
    if name.is_absolute():
        normal = Path(os.path.normpath(base_model))
        if not any(normal.is_relative_to(root) for root in roots):
            raise _not_allowed(base_model)
        candidates = [(normal, root) for root in roots if normal.is_relative_to(root)]
    else:
        candidates = [(root / name, root) for root in roots]
    for candidate, root in candidates:
        if _is_dir(candidate):
            resolved = candidate.resolve()
            # resolve() follows symlinks: a link inside a root that points outside it is refused as well.
            if not resolved.is_relative_to(root.resolve()):
                raise _not_allowed(base_model)
            return resolved
    if name.is_absolute():
        raise BaseModelNotFound(f"{base_model!r} is not a directory")
    return _from_hub_cache(base_model)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a name too long for the filesystem, a symlink loop: nothing a model could live at
        return False


def _not_allowed(base_model: str) -> BaseModelNotAllowed:
    return BaseModelNotAllowed(f"{base_model!r} is not a model under the configured model roots or a hub id; "
                               "the server reads models nowhere else")


def _from_hub_cache(base_model: str) -> Path:
    if base_model.count("/") != 1 or base_model.startswith(("/", ".", "~")):
        raise BaseModelNotFound(f"{base_model!r} is neither a model directory nor a hub id")
    try:
        validate_repo_id(base_model)
        cached = try_to_load_from_cache(base_model, "config.json")
    except (HFValidationError, ValueError) as exc:
        raise BaseModelNotFound(f"{base_model!r} is not a valid hub id: {exc}") from None
    if not isinstance(cached, str):
        raise BaseModelNotFound(
            f"{base_model!r} is not in the local Hugging Face cache; nothing is downloaded at run time")
    return Path(cached).parent


def _read_config(directory: Path, base_model: str) -> dict:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSpec(f"cannot read config.json of {base_model!r}: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidSpec(f"config.json of {base_model!r} is not a JSON object")
    return config


def model_shape(base_model: str, directory: Path | None) -> ModelShape:
    """The architecture: from config.json when the model is on disk, else from the planner's catalog."""
    if directory is not None:
        try:
            return ModelShape.from_config(_read_config(directory, base_model), name=base_model)
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidSpec(f"cannot plan for {base_model!r}: unsupported config.json ({exc})") from exc
    known = find_model(base_model)
    if known is None:
        raise BaseModelNotFound(f"{base_model!r} is not on this machine and not in the planner's catalog")
    return known


def context_length(directory: Path, base_model: str) -> int | None:
    """The longest sequence the model was built for, from its config.json; None when it does not say."""
    config = _read_config(directory, base_model)
    lengths = [config[key] for key in _CONTEXT_KEYS if isinstance(config.get(key), int) and config[key] > 0]
    return lengths[0] if lengths else None


def locate_for_planning(base_model: str, model_roots: list[Path] | None) -> ModelShape:
    """Planning works offline: a model on disk, else a catalog entry. A name outside the roots is refused."""
    try:
        directory = resolve_base_model_dir(base_model, model_roots)
    except BaseModelNotFound:
        directory = None
    return model_shape(base_model, directory)
