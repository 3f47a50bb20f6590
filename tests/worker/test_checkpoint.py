"""Checkpoints: atomic writes, keep-last-K, safetensors/JSON round trips of every optimizer, exact resume on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from harness import Killed, kill_after
from safetensors.torch import load_file

from domain.spec import GaloreOptions
from worker.training import checkpoint, loading, train
from worker.training.optimizers import OPTIMIZERS


def checkpointed_spec(make_spec, method="lora", *, optimizer="adamw", precision="bf16-mixed", **training):
    return make_spec(
        method,
        training={"max_steps": 8, "checkpoint_every_steps": 3, **training},
        memory={"optimizer": optimizer, "precision": precision},
    )


def step_dirs(output_dir) -> list[str]:
    return sorted(path.name for path in (output_dir / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adamw_4bit", "galore_adamw"]
)
def test_optimizer_state_round_trips_through_safetensors_and_json(make_spec, tmp_path, optimizer):
    """Save after two steps, load into a fresh optimizer, take the same third step: bit-identical results."""
    galore = optimizer.startswith("galore")
    spec = make_spec("full" if galore else "lora", memory={"optimizer": optimizer})
    torch.manual_seed(0)
    # 64 x 128 = 8192 elements: over bitsandbytes' min_8bit_size (4096), so 8-bit states (qmap, absmax) exist.
    start = [torch.randn(64, 128), torch.randn(8)]
    grads = [[torch.randn_like(tensor) for tensor in start] for _ in range(3)]

    def optimizer_at(weights):
        parameters = [torch.nn.Parameter(weight.clone()) for weight in weights]
        groups = parameters
        if galore:  # the matrix projected at rank 4; no SVD refresh in the third step: it uses the restored one
            named = [("model.layers.0.mlp.weight", parameters[0]), ("model.norm.weight", parameters[1])]
            groups = loading.galore_groups(named, 1e-3, GaloreOptions(rank=4, update_proj_gap=200))
            assert len(groups) == 2 and groups[0]["rank"] == 4 and groups[0]["params"] == [parameters[0]]
        return parameters, loading.build_optimizer(spec, groups, torch.device("cpu"))

    def step(parameters, built, grad):
        for parameter, g in zip(parameters, grad, strict=False):
            parameter.grad = g.clone()
        built.step()

    original_parameters, original = optimizer_at(start)
    for grad in grads[:2]:
        step(original_parameters, original, grad)
    checkpoint.save_tree(tmp_path, "optimizer", original.state_dict())
    saved_tensors = load_file(tmp_path / "optimizer.safetensors")
    if galore:
        assert any(name.endswith("projector.ortho_matrix") for name in saved_tensors)
    if optimizer.endswith("8bit"):
        assert any("qmap1" in name for name in saved_tensors) and any("absmax1" in name for name in saved_tensors)
        assert any(tensor.dtype == torch.uint8 for tensor in saved_tensors.values())

    restored_parameters, restored = optimizer_at([p.detach() for p in original_parameters])
    OPTIMIZERS[spec.memory.optimizer].load_state(restored, checkpoint.load_tree(tmp_path, "optimizer"))
    step(original_parameters, original, grads[2])
    step(restored_parameters, restored, grads[2])
    for expected, actual in zip(original_parameters, restored_parameters, strict=False):
        assert torch.equal(expected, actual)
    assert restored.param_groups[0]["betas"] == (0.9, 0.999)  # tuples survive JSON


def test_the_tree_encoding_keeps_int_keys_tuples_and_nested_tensors(tmp_path):
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "inner": {"absmax": torch.ones(2)}}},
        "betas": (0.9, 0.999),
        "none": None,
        "curve": [{"loss": 1.5}],
        "nan": float("inf"),
    }
    checkpoint.save_tree(tmp_path, "tree", tree)
    loaded = checkpoint.load_tree(tmp_path, "tree")
    assert set(loaded["state"]) == {0} and loaded["betas"] == (0.9, 0.999) and loaded["none"] is None
    assert torch.equal(loaded["state"][0]["inner"]["absmax"], torch.ones(2))
    assert loaded["curve"] == [{"loss": 1.5}] and loaded["nan"] == float("inf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tree.json", "tree.safetensors"]  # no pickles


@pytest.mark.parametrize(
    "method, optimizer, precision",
    [
        ("lora", "adamw", "bf16-mixed"),
        ("lora", "adamw_8bit", "fp16-mixed"),  # fp16: the grad scaler's state is in the checkpoint too
        ("qlora", "paged_adamw_8bit", "bf16-mixed"),
        ("qlora", "paged_adamw_32bit", "bf16-mixed"),
        ("full", "adamw", "bf16-mixed"),
    ],
)
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(
    make_spec, tiny_llama, demo_dataset, tmp_path, method, optimizer, precision
):
    """Same process, same threads, same seeded data order and RNG states: on the CPU a resumed run is
    bit-identical to one that never stopped."""
    spec = checkpointed_spec(make_spec, method, optimizer=optimizer, precision=precision)
    train(spec, base_model_dir=tiny_llama, dataset_path=demo_dataset, output_dir=tmp_path / "straight")
    with pytest.raises(Killed):
        train(
            spec,
            base_model_dir=tiny_llama,
            dataset_path=demo_dataset,
            output_dir=tmp_path / "killed",
            on_checkpoint=kill_after(6),
        )
    resumed_at = []
    result = train(
        spec,
        base_model_dir=tiny_llama,
        dataset_path=demo_dataset,
        output_dir=tmp_path / "killed",
        on_resume=resumed_at.append,
    )

    assert resumed_at == [6]
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("straight", "killed")]
    assert summaries[0]["loss_curve"] == summaries[1]["loss_curve"]  # steps 1-6 restored, 7-8 retrained
    assert summaries[1]["resumed_from_step"] == 6 and summaries[1]["tokens"] == summaries[0]["tokens"]
    saved = "adapter/adapter_model.safetensors" if method in ("lora", "qlora") else "model/model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / saved), load_file(tmp_path / "killed" / saved)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    # After a successful save the checkpoints are gone, and they were never artifacts.
    assert not (tmp_path / "killed" / "checkpoints").exists()
    assert not [artifact for artifact in result.artifacts if artifact.startswith("checkpoints")]


def test_checkpoints_are_written_every_n_steps_and_only_the_newest_k_are_kept(
    make_spec, tiny_llama, memorise_dataset, tmp_path
):
    spec = checkpointed_spec(make_spec, max_steps=12, checkpoint_every_steps=2, keep_checkpoints=2, micro_batch_size=3)
    written = []

    def record(step: int, path: str) -> None:
        written.append((step, path))
        if step == 8:
            raise Killed(path)

    stale = tmp_path / "checkpoints" / ".tmp-step-000004-999"  # left by a process killed mid-write
    stale.mkdir(parents=True)
    with pytest.raises(Killed):
        train(spec, base_model_dir=tiny_llama, dataset_path=memorise_dataset, output_dir=tmp_path, on_checkpoint=record)
    assert written == [(step, f"checkpoints/step-{step:06d}") for step in (2, 4, 6, 8)]
    assert step_dirs(tmp_path) == ["step-000006", "step-000008"]  # the stale temp dir is gone too
    for name in step_dirs(tmp_path):
        files = sorted(path.name for path in (tmp_path / "checkpoints" / name).iterdir())
        assert files == [
            "COMPLETE",
            "adapter",
            "metrics.json",
            "optimizer.json",
            "optimizer.safetensors",
            "trainable.json",
            "trainable.safetensors",
            "trainer.json",
            "trainer.safetensors",
        ]
    newest = tmp_path / "checkpoints" / "step-000008"
    trainer = json.loads((newest / "trainer.json").read_text())
    # 8 rows in steps of 3, 3 and 2: 8 steps consumed 2 whole epochs and 2 steps of the third.
    assert trainer["data_position"] == {"epoch": 2, "step_in_epoch": 2}
    metrics = json.loads((newest / "metrics.json").read_text())
    assert metrics["step"] == 8 and metrics["epoch"] == pytest.approx(8 / 3)
    assert metrics["train_loss"] == trainer["run"]["loss_curve"][-1]["loss"] and metrics["tokens_seen"] > 0
    # The adapter as peft writes it, holding exactly the trained LoRA weights of that step.
    assert sorted(path.name for path in (newest / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    adapter = load_file(newest / "adapter" / "adapter_model.safetensors")
    trained = checkpoint.load_tree(newest, "trainable")
    assert len(adapter) == len(trained) and all(
        torch.equal(tensor, trained[name.replace(".weight", ".default.weight")]) for name, tensor in adapter.items()
    )


def test_epoch_end_checkpoints_include_the_last_step(make_spec, tiny_llama, memorise_dataset, tmp_path):
    """8 rows in micro-batches of 3: epochs end at steps 3 and 6; the run's last step (7) is kept as well."""
    spec = make_spec(
        "lora", training={"max_steps": 7, "micro_batch_size": 3, "checkpoint_every_epoch": True, "keep_checkpoints": 3}
    )
    written = []
    train(
        spec,
        base_model_dir=tiny_llama,
        dataset_path=memorise_dataset,
        output_dir=tmp_path,
        on_checkpoint=lambda step, path: written.append(step),
    )
    assert written == [3, 6, 7]


def test_a_checkpoint_without_its_marker_is_ignored(make_spec, tiny_llama, demo_dataset, tmp_path):
    spec = checkpointed_spec(make_spec, max_steps=8, checkpoint_every_steps=2, keep_checkpoints=3)
    with pytest.raises(Killed):
        train(
            spec, base_model_dir=tiny_llama, dataset_path=demo_dataset, output_dir=tmp_path, on_checkpoint=kill_after(6)
        )
    (tmp_path / "checkpoints" / "step-000006" / checkpoint.MARKER).unlink()  # as if killed before the marker
    # A temp dir is never read, even with a marker in it (killed between the marker and the rename).
    (tmp_path / "checkpoints" / "step-000004").rename(tmp_path / "checkpoints" / ".tmp-step-000004-1")
    resumed_at = []
    train(spec, base_model_dir=tiny_llama, dataset_path=demo_dataset, output_dir=tmp_path, on_resume=resumed_at.append)
    assert resumed_at == [2]


def test_a_checkpoint_of_another_spec_is_refused(make_spec, tiny_llama, demo_dataset, tmp_path):
    with pytest.raises(Killed):
        train(
            checkpointed_spec(make_spec),
            base_model_dir=tiny_llama,
            dataset_path=demo_dataset,
            output_dir=tmp_path,
            on_checkpoint=kill_after(3),
        )
    with pytest.raises(ValueError, match="different job spec"):
        train(
            checkpointed_spec(make_spec, learning_rate=1e-3),
            base_model_dir=tiny_llama,
            dataset_path=demo_dataset,
            output_dir=tmp_path,
        )
    # The cadence and the number kept are not part of the trajectory: changing them still resumes.
    resumed_at = []
    train(
        checkpointed_spec(make_spec, checkpoint_every_steps=4, keep_checkpoints=5),
        base_model_dir=tiny_llama,
        dataset_path=demo_dataset,
        output_dir=tmp_path,
        on_resume=resumed_at.append,
    )
    assert resumed_at == [3]


def test_without_checkpoint_every_steps_nothing_is_written(make_spec, tiny_llama, demo_dataset, tmp_path):
    result = train(
        make_spec("lora", training={"max_steps": 3}),
        base_model_dir=tiny_llama,
        dataset_path=demo_dataset,
        output_dir=tmp_path,
        on_checkpoint=kill_after(1),
    )
    assert result.steps == 3 and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_exporting_a_checkpoints_adapter_leaves_the_run_unchanged(
    init, make_spec, tiny_llama, memorise_dataset, tmp_path
):
    """Exporting each checkpoint's adapter (for PiSSA converted for the original base, which peft does by loading
    a second adapter in eval mode) must not touch the run: it ends exactly where the same run unsaved does."""
    ranks: list[int] = []
    spec = make_spec("lora", lora={"init": init, "r": 4}, training={"max_steps": 3, "learning_rate": 1e-2})
    with_checkpoints = spec.model_copy(
        update={"training": spec.training.model_copy(update={"checkpoint_every_steps": 1})}
    )

    def record_rank(step: int, path: str) -> None:
        ranks.append(json.loads((tmp_path / "a" / path / "adapter" / "adapter_config.json").read_text())["r"])

    train(
        with_checkpoints,
        base_model_dir=tiny_llama,
        dataset_path=memorise_dataset,
        output_dir=tmp_path / "a",
        on_checkpoint=record_rank,
    )
    train(spec, base_model_dir=tiny_llama, dataset_path=memorise_dataset, output_dir=tmp_path / "b")
    assert ranks == ([8, 8] if init == "pissa" else [4, 4])  # PiSSA: converted to a rank-2r LoRA of the base
    first = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    second = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_every_out_of_memory_recovery_resumes_the_checkpoints_of_the_spec_before_it(make_spec):
    """planner/recovery.py's ladder and this fingerprint are one fact: what a recovery changes never makes its new
    attempt refuse the old attempt's checkpoints; the effective batch still does."""
    from planner.recovery import changed, ladder

    spec = make_spec(
        training={"micro_batch_size": 4, "gradient_accumulation_steps": 2},
        memory={"gradient_checkpointing": False, "fused_loss": False, "optimizer": "adamw_8bit"},
    )
    rungs = ladder(spec)
    assert len(rungs) == 5
    for rung in rungs:
        assert checkpoint.spec_fingerprint(changed(spec, rung)) == checkpoint.spec_fingerprint(spec), rung
    other_batch = make_spec(training={"micro_batch_size": 2, "gradient_accumulation_steps": 2}, memory=spec.memory)
    assert checkpoint.spec_fingerprint(other_batch) != checkpoint.spec_fingerprint(spec)
