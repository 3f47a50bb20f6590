"""worker.training.train end to end: real tiny models, real training on the CPU, real artifacts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from domain.errors import InvalidDataset, JobCancelled
from worker.training import Progress, TrainResult, train


def write_jsonl(path, rows: list):
    path.write_text("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return path


def run(spec, base, dataset, output_dir, **callbacks) -> tuple[TrainResult, list[Progress]]:
    reports: list[Progress] = []
    result = train(
        spec, base_model_dir=base, dataset_path=dataset, output_dir=output_dir, on_progress=reports.append, **callbacks
    )
    return result, reports


def test_qlora_with_paged_adamw_8bit_saves_an_adapter_that_changes_the_model(
    make_spec, tiny_llama, demo_dataset, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = make_spec(
        "qlora", training={"max_steps": 3, "learning_rate": 1e-2}, memory={"optimizer": "paged_adamw_8bit"}
    )
    result, reports = run(spec, tiny_llama, demo_dataset, tmp_path)

    assert result.steps == 3 and math.isfinite(result.final_loss)
    assert {
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "tokenizer/tokenizer.json",
        "summary.json",
    } <= set(result.artifacts)
    assert all((tmp_path / artifact).is_file() for artifact in result.artifacts)
    assert not [path for path in tmp_path.rglob("*") if path.suffix in {".bin", ".pt", ".pkl"}]  # no pickles
    adapter_config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert "lm_head" not in adapter_config["target_modules"]  # all-linear leaves the output layer alone

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    tokens = torch.tensor([[5, 60, 300, 7, 99, 512]])
    with torch.no_grad():
        before = base(tokens).logits
        tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
        after = tuned(tokens).logits
    assert not torch.allclose(before, after, atol=1e-4)


@pytest.mark.parametrize(
    "method, memory, lora",
    [
        ("lora", {}, None),
        (
            "lora",
            {"precision": "fp16-mixed", "optimizer": "adamw_8bit"},
            {"use_dora": True, "use_rslora": True, "r": 4},
        ),
        ("lora", {"precision": "bf16", "gradient_checkpointing": False}, {"target_modules": ["q_proj", "v_proj"]}),
        ("qlora", {"optimizer": "paged_adamw_32bit", "fused_loss": True}, None),
        ("full", {}, None),
        ("full", {"precision": "bf16", "optimizer": "adamw_8bit"}, None),
        ("full", {"precision": "fp32", "gradient_checkpointing": False}, None),
        ("freeze", {}, None),
    ],
)
def test_every_method_trains(make_spec, tiny_llama, demo_dataset, tmp_path, method, memory, lora):
    spec = make_spec(method, memory=memory, **({"lora": lora} if lora else {}))
    result, reports = run(spec, tiny_llama, demo_dataset, tmp_path)
    assert result.steps == 2 and [report.step for report in reports] == [1, 2]
    assert all(math.isfinite(report.loss) and report.loss > 0 for report in reports)
    saved = "adapter/adapter_model.safetensors" if method in ("lora", "qlora") else "model/model.safetensors"
    assert saved in result.artifacts
    # A whole model serves alone, its tokenizer beside it; an adapter's model/ exists only when merged.
    assert ("model/tokenizer.json" in result.artifacts) == (method in ("full", "freeze"))


def test_qwen2_architecture_trains(make_spec, tiny_qwen2, demo_dataset, tmp_path):
    spec = make_spec("lora").model_copy(update={"base_model": str(tiny_qwen2)})
    result, _ = run(spec, tiny_qwen2, demo_dataset, tmp_path)
    assert result.steps == 2 and math.isfinite(result.final_loss)


def test_freeze_trains_only_the_last_layers(make_spec, tiny_llama, demo_dataset, tmp_path):
    spec = make_spec("freeze", freeze={"trainable_layers": 1}, training={"learning_rate": 1e-2})
    run(spec, tiny_llama, demo_dataset, tmp_path)
    before, after = load_file(tiny_llama / "model.safetensors"), load_file(tmp_path / "model/model.safetensors")
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed)
    assert after["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16  # saved in the base's dtype


def test_freeze_more_layers_than_the_model_has(make_spec, tiny_llama, demo_dataset, tmp_path):
    with pytest.raises(ValueError, match="2 decoder layers"):
        run(make_spec("freeze", freeze={"trainable_layers": 3}), tiny_llama, demo_dataset, tmp_path)


def test_loss_falls_on_a_memorisable_dataset(make_spec, tiny_llama, memorise_dataset, tmp_path):
    spec = make_spec(
        "full",
        training={"max_steps": 30, "micro_batch_size": 8, "learning_rate": 1e-2},
        memory={"gradient_checkpointing": False},
    )
    result, reports = run(spec, tiny_llama, memorise_dataset, tmp_path)
    assert reports[0].loss > 6  # about ln(vocab): the random model knows nothing
    assert result.final_loss < reports[0].loss / 4
    assert reports[-1].epoch == pytest.approx(30.0)  # 8 rows, 8 per micro-batch: one step per epoch


def test_training_is_deterministic_on_cpu(make_spec, tiny_llama, demo_dataset, tmp_path):
    spec = make_spec("lora", training={"max_steps": 3})
    curves = []
    for attempt in ("a", "b"):
        run(spec, tiny_llama, demo_dataset, tmp_path / attempt)
        curves.append(json.loads((tmp_path / attempt / "summary.json").read_text())["loss_curve"])
    assert curves[0] == curves[1]
    other_seed = make_spec("lora", training={"max_steps": 3, "seed": 8})
    run(other_seed, tiny_llama, demo_dataset, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["loss_curve"] != curves[0]


def test_gradient_accumulation_matches_one_big_batch(make_spec, tiny_llama, demo_dataset, tmp_path):
    """Loss is normalised by the learned tokens of the whole step, so 2 x 2 accumulates to the same update as
    1 x 4 (same examples: the shuffle does not depend on the micro-batch size)."""
    fp32 = {"precision": "fp32", "gradient_checkpointing": False}
    one_batch = make_spec("full", training={"max_steps": 1, "micro_batch_size": 4}, memory=fp32)
    accumulated = make_spec(
        "full", training={"max_steps": 1, "micro_batch_size": 2, "gradient_accumulation_steps": 2}, memory=fp32
    )
    big, _ = run(one_batch, tiny_llama, demo_dataset, tmp_path / "big")
    small, _ = run(accumulated, tiny_llama, demo_dataset, tmp_path / "small")
    assert small.final_loss == pytest.approx(big.final_loss, rel=1e-5)
    big_weights, small_weights = (load_file(tmp_path / name / "model/model.safetensors") for name in ("big", "small"))
    for name, tensor in big_weights.items():
        torch.testing.assert_close(small_weights[name], tensor, rtol=1e-4, atol=1e-6)


def test_fused_loss_matches_the_plain_loss(make_spec, tiny_llama, demo_dataset, tmp_path):
    losses = {}
    for fused in (False, True):
        spec = make_spec("lora", memory={"fused_loss": fused, "precision": "fp32"})
        losses[fused] = [report.loss for report in run(spec, tiny_llama, demo_dataset, tmp_path / str(fused))[1]]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_progress_and_summary(make_spec, tiny_llama, demo_dataset, tmp_path):
    spec = make_spec("lora", training={"max_steps": 5, "logging_steps": 2})
    result, reports = run(spec, tiny_llama, demo_dataset, tmp_path)
    assert [report.step for report in reports] == [2, 4, 5]  # every logging_steps, and the last step
    for report in reports:
        assert report.total_steps == 5 and report.tokens_per_second > 0 and report.learning_rate > 0
        # No GPU here: memory is unknown, never a fake zero.
        assert report.memory_allocated_bytes is report.memory_reserved_bytes is report.memory_peak_bytes is None
    assert reports[-1].eta_seconds == 0 and reports[0].epoch < reports[-1].epoch
    assert result.peak_memory_bytes is None and result.wall_seconds > 0

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [point["step"] for point in summary["loss_curve"]] == [1, 2, 3, 4, 5]
    assert summary["final_loss"] == result.final_loss and summary["peak_memory_bytes"] is None
    assert set(summary["versions"]) == {"torch", "transformers", "peft", "bitsandbytes"}
    assert summary["artifacts"] == [artifact for artifact in result.artifacts if artifact != "summary.json"]


def test_should_stop_cancels(make_spec, tiny_llama, demo_dataset, tmp_path):
    calls = []

    def should_stop() -> bool:  # checked before every micro-step: let 3 through, then stop
        calls.append(1)
        return len(calls) > 3

    spec = make_spec("lora", training={"max_steps": 10, "micro_batch_size": 2, "gradient_accumulation_steps": 2})
    with pytest.raises(JobCancelled, match="cancelled at step 1"):
        run(spec, tiny_llama, demo_dataset, tmp_path / "out", should_stop=should_stop)
    assert not (tmp_path / "out").exists()  # nothing half-saved


def test_malformed_dataset_fails_before_any_model_load(make_spec, tmp_path):
    from ftjobs.tinymodel import DEMO_INSTRUCTIONS

    rows = DEMO_INSTRUCTIONS.read_text().splitlines()[:5] + ['{"instruction": "no output"}']
    dataset = write_jsonl(tmp_path / "bad.jsonl", rows)
    # The base model does not exist: reaching the loader would fail differently.
    with pytest.raises(InvalidDataset) as caught:
        train(
            make_spec("qlora"),
            base_model_dir=tmp_path / "no-such-model",
            dataset_path=dataset,
            output_dir=tmp_path / "out",
        )
    assert caught.value.line == 6


def test_auto_batch_size_must_be_resolved_first(make_spec, tiny_llama, demo_dataset, tmp_path):
    with pytest.raises(ValueError, match="auto"):
        run(make_spec("lora", training={"micro_batch_size": "auto"}), tiny_llama, demo_dataset, tmp_path)


def test_text_format_trains(make_spec, tiny_llama, tmp_path):
    dataset = write_jsonl(tmp_path / "text.jsonl", [{"text": f"Line {n}: the quick brown fox."} for n in range(6)])
    spec = make_spec("lora", dataset_format="text")
    result, _ = run(spec, tiny_llama, dataset, tmp_path / "out")
    assert result.steps == 2 and math.isfinite(result.final_loss)
