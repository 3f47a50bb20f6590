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
from service.errors import (
    BaseModelNotAllowed,
    BaseModelNotFound,
    InvalidSpec,
    ProblemError,
    UnsupportedArchitecture,
    UnsupportedQuantization,
)


def resolve_base_model_dir(base_model: str, model_roots: list[Path] | None) -> Path:
    """The directory holding config.json and safetensors weights; BaseModelNotAllowed or BaseModelNotFound."""
    directory = _model_dir(base_model, model_roots)
    if not (directory / "config.json").is_file():
        raise BaseModelNotFound(f"{base_model!r} has no config.json")
    # Only safetensors: a pickled checkpoint could run code in the worker when loaded.
    if not any(directory.glob("*.safetensors")):
        raise BaseModelNotFound(f"{base_model!r} has no *.safetensors weights")
    return directory


def _model_dir(base_model: str, model_roots: list[Path] | None) -> Path:
    if model_roots is None:
        candidate = Path(base_model).expanduser()
        return candidate.resolve() if candidate.is_dir() else _from_hub_cache(base_model)
    return _inside_roots(base_model, model_roots)


def _inside_roots(base_model: str, roots: list[Path]) -> Path:
    name = PurePosixPath(base_model)
    # Decided from the string alone: no filesystem call happens for a name that could leave the roots.
    if (
        base_model.startswith("~")
        or ".." in name.parts
        or "\\" in base_model
        or any(not ch.isprintable() for ch in base_model)
    ):
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
    return BaseModelNotAllowed(
        f"{base_model!r} is not a model under the configured model roots or a hub id; "
        "the server reads models nowhere else"
    )


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
            f"{base_model!r} is not in the local Hugging Face cache; nothing is downloaded at run time"
        )
    return Path(cached).parent


def _read_config(config_path: Path, base_model: str) -> dict:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidSpec(f"cannot read config.json of {base_model!r}: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidSpec(f"config.json of {base_model!r} is not a JSON object")
    return config


def model_shape(base_model: str, config_path: Path | None) -> ModelShape:
    """The architecture: from config.json when one is on disk (it always wins over a catalog entry of the same
    name), else from the planner's catalog. A config the planner does not model is refused with its code."""
    if config_path is not None:
        try:
            return ModelShape.from_config(_read_config(config_path, base_model), name=base_model)
        except (KeyError, ValueError, TypeError) as exc:
            raise _refusal(exc, base_model) from exc
    known = find_model(base_model)
    if known is None:
        raise BaseModelNotFound(f"{base_model!r} is not on this machine and not in the planner's catalog")
    return known


def _refusal(exc: Exception, base_model: str) -> ProblemError:
    error = {
        "unsupported_architecture": UnsupportedArchitecture,
        "unsupported_quantization": UnsupportedQuantization,
    }.get(getattr(exc, "code", ""), InvalidSpec)
    return error(f"cannot plan for {base_model!r}: {exc}")


def planning_config(base_model: str, model_roots: list[Path] | None) -> Path | None:
    """The config.json to plan from, weights or not (people download config.json alone to plan): a model
    directory's (inside the roots, when there are roots), else the local hub cache's; None sends the lookup to
    the catalog. A name outside the roots is refused, never looked up."""
    try:
        directory = _model_dir(base_model, model_roots)
    except BaseModelNotFound:
        return None
    config = directory / "config.json"
    if not config.is_file():
        raise BaseModelNotFound(f"{base_model!r} has no config.json")
    return config


def locate_for_planning(base_model: str, model_roots: list[Path] | None) -> ModelShape:
    """Planning works offline and needs no weights: a config.json on disk, else a catalog entry. Submitting a job
    still resolves the weights (resolve_base_model_dir)."""
    return model_shape(base_model, planning_config(base_model, model_roots))
