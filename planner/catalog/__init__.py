"""Shapes of well-known hub models, so a plan needs no download: find_model("Qwen/Qwen2.5-7B").

Data: models.json next to this file (config.json values; see its "_source").
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from planner.shapes import ModelShape

_DATA = Path(__file__).with_name("models.json")


@lru_cache(maxsize=1)
def _index() -> dict[str, ModelShape]:
    """Lower-cased hub id (and alias) -> shape."""
    index: dict[str, ModelShape] = {}
    for hub_id, entry in json.loads(_DATA.read_text())["models"].items():
        shape = ModelShape.from_config(entry["config"], name=hub_id)
        for key in [hub_id, *entry.get("aliases", [])]:
            index[key.lower()] = shape
    return index


def find_model(name: str) -> ModelShape | None:
    """The catalog shape of a hub id (case-insensitive; -Instruct variants included), or None.
    A local directory named like the hub model ("/models/Qwen2.5-7B") matches by its last component."""
    key = name.strip().rstrip("/").lower()
    index = _index()
    if key in index:
        return index[key]
    base = key.rsplit("/", 1)[-1]
    for hub_id, shape in index.items():
        if hub_id.rsplit("/", 1)[-1] == base:
            return shape
    return None


def model_ids() -> list[str]:
    return sorted({shape.name for shape in _index().values()})
