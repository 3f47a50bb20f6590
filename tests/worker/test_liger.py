"""memory.liger_kernels: liger-kernel's Triton kernels on CUDA (RMSNorm, SwiGLU, RoPE, fused linear
cross-entropy). On the CPU the worker keeps transformers' modules and the chunked loss, and says so."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from domain.spec import JobSpec
from worker.training.recipe import train

FP32 = {"precision": "fp32", "optimizer": "adamw"}


def run(spec, model_dir, dataset, out) -> dict:
    train(spec, base_model_dir=model_dir, dataset_path=dataset, output_dir=out)
    return json.loads((out / "summary.json").read_text())


def test_on_the_cpu_liger_is_skipped_with_the_reason_and_the_chunked_loss_trains(
    make_spec, tiny_llama, memorise_dataset, tmp_path, caplog
):
    plain = run(make_spec("lora", memory=FP32, lora={"dropout": 0.0}), tiny_llama, memorise_dataset, tmp_path / "p")
    spec = make_spec("lora", memory=FP32 | {"liger_kernels": True}, lora={"dropout": 0.0})
    with caplog.at_level(logging.INFO, logger="worker.training.kernels"):
        asked = run(spec, tiny_llama, memorise_dataset, tmp_path / "l")
    assert "memory.liger_kernels: skipped on cpu (Triton kernels need CUDA)" in caplog.text
    assert asked["liger_kernels"] is False and plain["liger_kernels"] is False
    assert [p["loss"] for p in asked["loss_curve"]] == [p["loss"] for p in plain["loss_curve"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton: they run on CUDA only")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_liger_trains_as_the_plain_modules_on_cuda(tiny_qwen2, memorise_dataset, tmp_path, method):
    pytest.importorskip("liger_kernel", reason="liger-kernel is the worker image's [cuda] extra")
    from transformers.models.qwen2 import modeling_qwen2

    def spec(liger: bool) -> JobSpec:
        return JobSpec(
            base_model=str(tiny_qwen2), method=method, lora={"dropout": 0.0},
            training={"max_steps": 6, "micro_batch_size": 4, "max_seq_length": 128, "seed": 7},
            memory={"precision": "bf16-mixed", "optimizer": "adamw", "liger_kernels": liger},
        )  # fmt: skip

    plain = run(spec(False), tiny_qwen2, memorise_dataset, tmp_path / "p")
    liger = run(spec(True), tiny_qwen2, memorise_dataset, tmp_path / "l")
    assert liger["liger_kernels"] is True and plain["liger_kernels"] is False
    assert modeling_qwen2.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    losses = [[p["loss"] for p in summary["loss_curve"]] for summary in (plain, liger)]
    # bf16 kernels in another order of operations: close, not equal
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < 2e-2, losses
