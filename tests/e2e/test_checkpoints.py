"""Checkpoints through the native API: kept after success as keep_checkpoints says, listed with their metrics,
and for a full fine-tune downloadable as the trained parameters that load onto the base."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from safetensors.torch import load

ROWS = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))} for i in range(1, 9)]


@pytest.fixture(scope="module")
def counting(data_root) -> str:
    (data_root / "counting.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return "counting.jsonl"


def test_a_full_fine_tune_keeps_its_last_epoch_checkpoint_as_trained_weights(
    api, worker, tiny_model, counting, wait_for_status
):
    from transformers import AutoModelForCausalLM

    spec = {
        "base_model": str(tiny_model),
        "dataset": {"path": counting},
        "method": "full",
        "training": {
            "epochs": 2,
            "micro_batch_size": 2,
            "max_seq_length": 64,
            "learning_rate": 1e-3,
            "checkpoint_every_epoch": True,
            "keep_checkpoints": 1,
        },
    }
    job = api.post("/v1/jobs", json=spec).json()
    done = wait_for_status(job["id"], {"succeeded", "failed", "cancelled"})
    assert done["status"] == "succeeded", done["error"]

    kept = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["step"] for c in kept] == [8]  # epochs ended at 4 and 8; keep_checkpoints 1 holds after success
    assert kept[0]["metrics"]["epoch"] == 2 and kept[0]["metrics"]["train_loss"] > 0
    download = api.get(kept[0]["url"])
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert sorted(tar.getnames()) == ["metrics.json", "trainable.json", "trainable.safetensors"]
        weights = load(tar.extractfile("trainable.safetensors").read())
    state = {name.removeprefix("trainable."): tensor for name, tensor in weights.items()}
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(state) == set(before)  # every weight of the model trained
    assert any(not torch.equal(before[name], parameter) for name, parameter in model.named_parameters())
    assert api.get(f"/v1/jobs/{job['id']}/checkpoints/4/download").json()["code"] == "checkpoint_not_found"
