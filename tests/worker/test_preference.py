"""Preference tuning in the recipe: dpo learns a preference that holds on held-out pairs, a killed dpo run with a
precomputed reference resumes to the uninterrupted result without recomputing it, the references agree with each
other, and only the completions' tokens are learned."""

from __future__ import annotations

import json
import random
import re
import shutil

import pytest
import torch
from harness import Killed, kill_after
from safetensors.torch import load_file

from domain.datasets import LabeledExample, Message, PreferenceExample
from domain.errors import InvalidDataset
from domain.spec import JobSpec
from worker.training import data, train
from worker.training.reference import REFERENCE_FILE

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
ANIMALS = ["cat", "dog", "horse", "mouse", "sheep", "goat", "duck", "fish"]
THINGS = ["house", "river", "table", "cloud", "stone", "bread", "book", "door", "hill", "tree", "road", "lamp"]


@pytest.fixture(scope="module")
def preference_dataset(tmp_path_factory):
    """96 pairs: a colour is preferred to an animal, for any thing described. Held-out pairs are new combinations,
    so a model that learned the pairs by heart gains nothing on them."""
    rng = random.Random(0)
    rows = [
        {"prompt": f"Describe the {rng.choice(THINGS)}: ", "chosen": f"it is {rng.choice(COLOURS)}",
         "rejected": f"it is a {rng.choice(ANIMALS)}"}
        for _ in range(96)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("preference") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _spec(tiny_llama, method="lora", *, training=None, **fields) -> JobSpec:
    return JobSpec(
        base_model=str(tiny_llama),
        dataset={"path": "pairs.jsonl"},
        method=method,
        objective=fields.pop("objective", "dpo"),
        dataset_format="preference",
        training={
            "micro_batch_size": 8,
            "max_seq_length": 64,
            "seed": 7,
            "validation_fraction": 0.25,
            **(training or {}),
        },  # fmt: skip
        **fields,
    )


def test_dpo_raises_the_held_out_preference_accuracy_above_0_9(tiny_llama, preference_dataset, tmp_path):
    spec = _spec(tiny_llama, training={"max_steps": 30, "learning_rate": 1e-3, "logging_steps": 1})
    reports = []
    train(
        spec,
        base_model_dir=tiny_llama,
        dataset_path=preference_dataset,
        output_dir=tmp_path,
        on_progress=reports.append,
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["eval_accuracy"] > 0.9 and summary["eval_curve"][-1]["eval_accuracy"] == summary["eval_accuracy"]
    # Step 1 starts at the reference (margin 0: an accuracy of 0, no reward is higher); the margin then grows.
    margins = [report.preference["margin"] for report in reports]
    assert margins[0] == 0.0 and margins[-1] > 4 * margins[1] > 0, margins
    assert summary["objective"] == "dpo" and summary["reference"]["kind"] == "adapter_disabled"
    last = reports[-1].preference
    assert last["margin"] > 0 and last["chosen_reward"] > last["rejected_reward"] and last["eval_accuracy"] > 0.9
    assert summary["loss_curve"][-1]["loss"] < summary["loss_curve"][0]["loss"] < 0.6932  # from ln 2, down


def test_a_killed_dpo_run_resumes_with_its_precomputed_reference_read_back_not_recomputed(
    tiny_llama, preference_dataset, tmp_path
):
    spec = _spec(
        tiny_llama, "full", training={"max_steps": 6, "micro_batch_size": 4, "checkpoint_every_steps": 3}
    )  # 72 training pairs: 18 micro-batches an epoch, so step 3 is mid-epoch
    train(spec, base_model_dir=tiny_llama, dataset_path=preference_dataset, output_dir=tmp_path / "straight")
    with pytest.raises(Killed):
        train(spec, base_model_dir=tiny_llama, dataset_path=preference_dataset, output_dir=tmp_path / "killed",
              on_checkpoint=kill_after(3))  # fmt: skip
    table = load_file(tmp_path / "killed" / REFERENCE_FILE)["logps"]
    # Another machine: it gets the checkpoint from storage, nothing else of the output dir.
    shutil.copytree(tmp_path / "killed" / "checkpoints", tmp_path / "elsewhere" / "checkpoints")
    for output in ("killed", "elsewhere"):
        resumed_at = []
        train(spec, base_model_dir=tiny_llama, dataset_path=preference_dataset, output_dir=tmp_path / output,
              on_resume=resumed_at.append)  # fmt: skip
        assert resumed_at == [3]
        straight, resumed = (
            json.loads((tmp_path / name / "summary.json").read_text()) for name in ("straight", output)
        )
        assert straight["reference"] == {
            "kind": "precomputed",
            "computed": True,
            "seconds": straight["reference"]["seconds"],
        }
        assert resumed["reference"] == {"kind": "precomputed", "computed": False, "seconds": None}
        assert resumed["loss_curve"] == straight["loss_curve"] and resumed["eval_accuracy"] == straight["eval_accuracy"]
        assert torch.equal(load_file(tmp_path / output / REFERENCE_FILE)["logps"], table)


def test_a_copied_reference_and_a_precomputed_one_train_alike(tiny_llama, preference_dataset, tmp_path):
    results = {}
    for reference in ("copy", "precomputed"):
        spec = _spec(tiny_llama, "full", training={"max_steps": 2, "micro_batch_size": 4}, dpo={"reference": reference})
        train(spec, base_model_dir=tiny_llama, dataset_path=preference_dataset, output_dir=tmp_path / reference)
        curve = json.loads((tmp_path / reference / "summary.json").read_text())["loss_curve"]
        results[reference] = [point["loss"] for point in curve]
    assert results["copy"] == pytest.approx(results["precomputed"], rel=1e-5)
    assert (
        results["copy"][0] == pytest.approx(0.6931, abs=1e-3) and results["copy"][1] < results["copy"][0]
    )  # the policy starts as its reference


@pytest.mark.parametrize("objective", ["orpo", "kto"])
def test_orpo_and_kto_train_on_qlora_and_report_what_they_are_watched_by(tiny_llama, preference_dataset, tmp_path,
                                                                         objective):  # fmt: skip
    path = preference_dataset
    if objective == "kto":  # each pair becomes two labelled completions
        rows = [json.loads(line) for line in preference_dataset.read_text().splitlines()]
        path = tmp_path / "kto.jsonl"
        path.write_text("".join(
            json.dumps({"prompt": row["prompt"], "completion": row[key], "label": key == "chosen"}) + "\n"
            for row in rows for key in ("chosen", "rejected")
        ))  # fmt: skip
    spec = JobSpec(
        base_model=str(tiny_llama), dataset={"path": "x.jsonl"}, method="qlora", objective=objective,
        dataset_format="kto" if objective == "kto" else "preference",
        training={"max_steps": 3, "micro_batch_size": 4, "max_seq_length": 64, "seed": 7},
    )  # fmt: skip
    reports = []
    train(spec, base_model_dir=tiny_llama, dataset_path=path, output_dir=tmp_path / "out", on_progress=reports.append)
    expected = {"chosen_reward", "rejected_reward", "margin"} | ({"kl"} if objective == "kto" else {"accuracy"})
    assert set(reports[-1].preference) == expected
    assert all(value == value for value in reports[-1].preference.values())  # no NaN


def test_only_the_completion_tokens_of_a_chat_pair_are_learned(tiny_llama):
    tokenizer = data.load_tokenizer(tiny_llama)
    example = PreferenceExample(
        line=1,
        prompt=(Message("system", "Be brief."), Message("user", "Sky colour?")),
        chosen=(Message("assistant", "Blue."),),
        rejected=(Message("assistant", "It is a cat, of course."),),
    )
    [pair], dropped = data.tokenize_scored(tokenizer, [example], max_seq_length=256)
    assert dropped == 0 and pair.index == 0
    for sequence, answer in ((pair.chosen, "Blue."), (pair.rejected, "It is a cat, of course.")):
        learned = [token for token, label in zip(sequence.input_ids, sequence.labels, strict=True) if label != -100]
        prompt = [token for token, label in zip(sequence.input_ids, sequence.labels, strict=True) if label == -100]
        assert answer in tokenizer.decode(learned) and "Sky" not in tokenizer.decode(learned)
        assert "Be brief." in tokenizer.decode(prompt) and "Sky colour?" in tokenizer.decode(prompt)
        assert answer not in tokenizer.decode(prompt)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"method": "full", "dpo": {"reference": "adapter_disabled"}}, "full has none; use 'precomputed'"),
        ({"method": "lora", "dpo": {"reference": "copy"}}, "use 'adapter_disabled' or 'precomputed'"),
        ({"method": "lora", "lora": {"init": "pissa"}}, "which PiSSA has moved"),
        ({"dataset_format": "alpaca"}, "trains on dataset_format preference or openai_preference, not alpaca"),
        ({"kto": {"beta": 0.2}}, "'kto' options apply to objective kto"),
        ({"training": {"packing": True}}, "training.packing is sft only"),
        ({"memory": {"liger_kernels": True}}, "leave memory.liger_kernels unset"),
        ({"resources": {"num_gpus": 2, "sharding": "zero3"}, "method": "full"}, "trains on one GPU"),
    ],
)
def test_a_preference_spec_that_cannot_work_is_refused_with_the_reason(tiny_llama, fields, reason):
    base = {"method": "lora", "objective": "dpo", "dataset_format": "preference"}
    with pytest.raises(ValueError, match=re.escape(reason)):
        JobSpec(base_model=str(tiny_llama), dataset={"path": "x.jsonl"}, **{**base, **fields})


def test_the_reference_defaults_to_the_adapters_own_base_or_else_a_first_pass(tiny_llama):
    def reference(method: str, objective: str = "dpo") -> str | None:
        fmt = {"dpo": "preference", "kto": "kto", "orpo": "preference"}[objective]
        spec = JobSpec(
            base_model=str(tiny_llama), dataset={"path": "x"}, method=method, objective=objective, dataset_format=fmt
        )
        return spec.reference

    assert [reference(method) for method in ("lora", "qlora", "full", "freeze")] == [
        "adapter_disabled", "adapter_disabled", "precomputed", "precomputed",
    ]  # fmt: skip
    assert reference("full", "kto") == "precomputed" and reference("lora", "orpo") is None


def test_kto_rows_that_mix_text_and_message_prompts_fail_before_training(tiny_llama):
    tokenizer = data.load_tokenizer(tiny_llama)
    rows = [
        LabeledExample(1, "Sky colour? ", "Blue.", True),
        LabeledExample(2, (Message("user", "Sky colour?"),), (Message("assistant", "A cat."),), False),
    ]
    with pytest.raises(InvalidDataset, match="mix text and message prompts"):
        data.tokenize_scored(tokenizer, rows, max_seq_length=64)
