"""The dpo, kto and orpo losses equal TRL's (trl==1.16.0, pinned in the dev extra) on the same batch: the same
tiny model, the same token ids, TRL's trainer computing its loss beside ours. LoRA's B is perturbed first, so the
policy is not its own reference and every term of the loss is exercised."""

from __future__ import annotations

import math
import os

import pytest
import torch

from domain.spec import JobSpec
from worker.training import data
from worker.training.objectives import Stats, build_objective, totals
from worker.training.reference import AdapterDisabled, FrozenCopy, Precomputed

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOLERANCE = 1e-5
# (prompt, first completion, second completion) token ids: unequal lengths, so padding is exercised too
ROWS = [
    ([1, 17, 23, 5], [40, 41, 42, 2], [50, 2]),
    ([1, 9], [60, 61, 2], [70, 71, 72, 73, 2]),
    ([1, 30, 31, 32, 33], [80, 2], [81, 82, 2]),
]
LABELS = [True, False, True]  # kto: whether each row's first completion is desirable


def _example(prompt: list[int], completion: list[int]) -> data.TokenizedExample:
    return data.TokenizedExample(input_ids=prompt + completion, labels=[data.IGNORE_INDEX] * len(prompt) + completion)


def _pairs() -> list[data.TokenizedPair]:
    return [_example_pair(index, *row) for index, row in enumerate(ROWS)]


def _example_pair(index, prompt, chosen, rejected) -> data.TokenizedPair:
    return data.TokenizedPair(_example(prompt, chosen), _example(prompt, rejected), index)


def _spec(tiny_llama, method: str, objective: str, **options) -> JobSpec:
    fmt = "kto" if objective == "kto" else "preference"
    return JobSpec(
        base_model=str(tiny_llama), dataset={"path": "x.jsonl"}, method=method, objective=objective,
        dataset_format=fmt, **options,
    )  # fmt: skip


def _args(config_class, tmp_path, **fields):
    return config_class(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=len(ROWS), **fields,
    )  # fmt: skip


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _base(tiny_llama):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def _perturb(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def _ours(spec, model, rows, reference, tokenizer):
    def collate(batch):
        return data.collate(batch, tokenizer.pad_token_id, torch.device("cpu"))

    objective = build_objective(spec, fused=False, reference=reference)
    stats = Stats()
    loss = objective.loss(model, collate, rows, totals([rows]), stats)
    return loss.item(), stats


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_lora_with_its_adapters_off_as_the_reference_equals_trl(tiny_llama, tmp_path, loss_type):
    tokenizer = data.load_tokenizer(tiny_llama)
    trainer = trl.DPOTrainer(
        model=_base(tiny_llama),
        args=_args(trl.DPOConfig, tmp_path, beta=0.3, loss_type=[loss_type]),
        train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    _perturb(trainer.model)
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in ROWS])
    theirs = trainer.compute_loss(trainer.model, batch).item()
    spec = _spec(tiny_llama, "lora", "dpo", dpo={"beta": 0.3, "loss_type": loss_type})
    ours, stats = _ours(spec, trainer.model, _pairs(), AdapterDisabled(fused=False), tokenizer)
    assert abs(ours - theirs) < TOLERANCE, (ours, theirs)
    assert abs(theirs - (math.log(2) if loss_type == "sigmoid" else 1 / (2 * 0.3) ** 2)) > 1e-3  # B moved the policy
    assert stats.report()["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_dpo_full_with_a_precomputed_or_copied_reference_equals_trl_with_its_reference_model(tiny_llama, tmp_path):
    tokenizer = data.load_tokenizer(tiny_llama)
    policy, reference_model = _base(tiny_llama), _base(tiny_llama)
    with torch.no_grad():  # the policy has moved from the reference
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference_model,
        args=_args(trl.DPOConfig, tmp_path, beta=0.1),
        train_dataset=datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in ROWS])
    theirs = trainer.compute_loss(trainer.model, batch).item()
    spec = _spec(tiny_llama, "full", "dpo", dpo={"reference": "copy"})
    copied, _ = _ours(spec, trainer.model, _pairs(), FrozenCopy(reference_model, fused=False), tokenizer)
    rows = _pairs()
    table = FrozenCopy(reference_model, fused=False).logps(
        reference_model, lambda batch: data.collate(batch, tokenizer.pad_token_id, torch.device("cpu")), rows
    )
    precomputed, _ = _ours(spec, trainer.model, rows, Precomputed(table.T.contiguous()), tokenizer)
    assert abs(copied - theirs) < TOLERANCE, (copied, theirs)
    assert abs(precomputed - theirs) < TOLERANCE, (precomputed, theirs)


def test_kto_lora_equals_trl_with_each_row_scored_against_the_next_rows_completion(tiny_llama, tmp_path):
    tokenizer = data.load_tokenizer(tiny_llama)
    trainer = trl.KTOTrainer(
        model=_base(tiny_llama),
        args=_args(trl.KTOConfig, tmp_path, beta=0.2, desirable_weight=1.5, undesirable_weight=0.7),
        train_dataset=datasets.Dataset.from_list(
            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}]
        ),
        processing_class=tokenizer,
        peft_config=_lora(),
    )
    _perturb(trainer.model)
    following = [ROWS[(i + 1) % len(ROWS)][1] for i in range(len(ROWS))]
    batch = trainer.data_collator(
        [
            {"prompt_ids": prompt, "completion_ids": completion, "KL_completion_ids": other, "label": label}
            for (prompt, completion, _), other, label in zip(ROWS, following, LABELS, strict=True)
        ]
    )
    theirs = trainer.compute_loss(trainer.model, batch).item()
    rows = [
        data.TokenizedLabeled(_example(prompt, completion), _example(prompt, other), label, index)
        for index, ((prompt, completion, _), other, label) in enumerate(zip(ROWS, following, LABELS, strict=True))
    ]
    spec = _spec(tiny_llama, "lora", "kto", kto={"beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.7})
    ours, stats = _ours(spec, trainer.model, rows, AdapterDisabled(fused=False), tokenizer)
    assert abs(ours - theirs) < TOLERANCE, (ours, theirs)
    assert stats.report()["kl"] >= 0.0


def _orpo_trainer(tiny_llama, tmp_path, prompt: str):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    rows = [{"prompt": prompt, "chosen": " blue sky", "rejected": " green"}, {"prompt": prompt, "chosen": " red",
            "rejected": " yellow sun today"}]  # fmt: skip
    trainer = ORPOTrainer(
        model=_base(tiny_llama),
        args=_args(ORPOConfig, tmp_path, beta=0.25, max_length=64, max_completion_length=32),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=data.load_tokenizer(tiny_llama),
        peft_config=_lora(),
    )
    _perturb(trainer.model)
    tokenized = list(trainer.train_dataset)
    _, metrics = trainer.get_batch_loss_metrics(trainer.model, trainer.data_collator(tokenized))
    pairs = [
        data.TokenizedPair(_orpo_row(row, "chosen"), _orpo_row(row, "rejected"), index)
        for index, row in enumerate(tokenized)
    ]
    return trainer, metrics, pairs


def _orpo_row(row: dict, which: str) -> data.TokenizedExample:
    return data.TokenizedExample(input_ids=row[f"{which}_input_ids"], labels=row[f"{which}_labels"])


def test_orpo_lora_equals_trl_where_the_prompt_is_only_bos(tiny_llama, tmp_path):
    """TRL's ORPO NLL also covers the prompt's tokens; ours the completion's only (as every ftjobs loss). With a
    prompt of BOS alone, which no loss predicts, the two are the same loss."""
    trainer, metrics, pairs = _orpo_trainer(tiny_llama, tmp_path, prompt="")
    assert all(pair.chosen.labels.count(data.IGNORE_INDEX) == 1 for pair in pairs)  # BOS only
    theirs = float(metrics["nll_loss"]) - 0.25 * float(metrics["log_odds_ratio"])
    ours, _ = _ours(_spec(tiny_llama, "lora", "orpo", orpo={"beta": 0.25}), trainer.model, pairs, None,
                    trainer.processing_class)  # fmt: skip
    assert abs(ours - theirs) < TOLERANCE, (ours, theirs)


def test_orpo_odds_ratio_term_equals_trl_behind_a_real_prompt(tiny_llama, tmp_path):
    trainer, metrics, pairs = _orpo_trainer(tiny_llama, tmp_path, prompt="Name a colour:")
    spec = _spec(tiny_llama, "lora", "orpo", orpo={"beta": 0.25})
    _, stats = _ours(spec, trainer.model, pairs, None, trainer.processing_class)
    log_odds = stats.sums["log_odds"].item() / len(pairs)
    assert abs(log_odds - float(metrics["log_odds_chosen"])) < TOLERANCE
    chosen_reward = stats.report()["chosen_reward"]
    assert abs(chosen_reward - float(metrics["rewards/chosen"])) < TOLERANCE
