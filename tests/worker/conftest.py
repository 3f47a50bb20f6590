"""Fixtures for the training engine: tiny real models built offline, small datasets, spec builders."""

from __future__ import annotations

from pathlib import Path

import pytest

from domain.spec import JobSpec
from ftjobs.tinymodel import DEMO_INSTRUCTIONS, build_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", seed=0)


@pytest.fixture(scope="session")
def demo_dataset() -> Path:
    return DEMO_INSTRUCTIONS


@pytest.fixture(scope="session")
def memorise_dataset(tmp_path_factory) -> Path:
    """Eight demo rows: small enough for a tiny model to learn by heart in a few dozen steps."""
    rows = DEMO_INSTRUCTIONS.read_text().splitlines()[:8]
    path = tmp_path_factory.mktemp("data") / "memorise.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture()
def make_spec(tiny_llama):
    """JobSpec with test-sized defaults; keyword groups override them (training={...}, memory={...})."""

    def build(method: str = "lora", *, training: dict | None = None, memory: dict | None = None, **fields) -> JobSpec:
        return JobSpec(
            base_model=str(tiny_llama),
            method=method,
            training={"max_steps": 2, "micro_batch_size": 4, "max_seq_length": 128, "seed": 7, **(training or {})},
            memory=memory or {},
            **fields,
        )

    return build
