"""memory.compile_layers: every decoder layer torch.compile'd (regional compilation), compiled before step 1 as a
phase of its own, and the run trains exactly as the eager one (on the CPU, inductor's C++ backend)."""

from __future__ import annotations

import json

from worker.training.recipe import train

FP32 = {"precision": "fp32", "optimizer": "adamw"}
NO_DROPOUT = {"dropout": 0.0}  # compiled dropout draws from another generator than eager: masks differ


def run(spec, tiny_llama, dataset, out, **hooks) -> dict:
    train(spec, base_model_dir=tiny_llama, dataset_path=dataset, output_dir=out, **hooks)
    return json.loads((out / "summary.json").read_text())


def test_compiled_layers_train_as_eager_and_report_their_compile_time(
    make_spec, tiny_llama, memorise_dataset, tmp_path
):
    eager_spec = make_spec("lora", training={"max_steps": 3}, memory=FP32, lora=NO_DROPOUT)
    eager = run(eager_spec, tiny_llama, memorise_dataset, tmp_path / "e")
    seconds: list[float] = []
    spec = make_spec("lora", training={"max_steps": 3}, memory=FP32 | {"compile_layers": True}, lora=NO_DROPOUT)
    compiled = run(spec, tiny_llama, memorise_dataset, tmp_path / "c", on_compiled=seconds.append)
    print(f"compile {seconds}, train {compiled['train_seconds']:.2f} s vs eager {eager['train_seconds']:.2f} s")
    assert len(seconds) == 1 and seconds[0] > 0 and compiled["compile_seconds"] == seconds[0]
    assert eager["compile_seconds"] is None
    # Its own phase: compiling happened before step 1 (no recompile after it: dynamic shapes), so the steps
    # take less than the compile did; tokens/s is over the steps alone.
    assert compiled["train_seconds"] < seconds[0]
    eager_losses = [point["loss"] for point in eager["loss_curve"]]
    compiled_losses = [point["loss"] for point in compiled["loss_curve"]]
    assert max(abs(a - b) for a, b in zip(compiled_losses, eager_losses, strict=True)) < 1e-5
