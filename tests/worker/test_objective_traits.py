"""One source of truth for preference tuning's memory: the planner's objective and reference registries
(planner/objectives.py) say what the worker's objectives (worker/training/objectives.py) and references
(worker/training/reference.py) run. Counted here as the worker collates them: the rows of every forward per example,
with grad and without, on a tiny real model."""

from __future__ import annotations

import pytest
import torch

from domain.spec import JobSpec, Objective
from planner.objectives import OBJECTIVES as OBJECTIVE_TRAITS
from planner.objectives import REFERENCES
from worker.training import data, reference
from worker.training.objectives import OBJECTIVES, Stats, build_objective, totals

EXAMPLES = 3
PROMPT, FIRST, SECOND = [1, 17, 23, 5], [40, 41, 42, 2], [50, 2]


def _sequence(completion: list[int]) -> data.TokenizedExample:
    return data.TokenizedExample(input_ids=PROMPT + completion, labels=[data.IGNORE_INDEX] * len(PROMPT) + completion)


def _rows(objective: Objective) -> list:
    if objective is Objective.sft:
        return [_sequence(FIRST) for _ in range(EXAMPLES)]
    if objective is Objective.kto:
        return [data.TokenizedLabeled(_sequence(FIRST), _sequence(SECOND), i % 2 == 0, i) for i in range(EXAMPLES)]
    return [data.TokenizedPair(_sequence(FIRST), _sequence(SECOND), i) for i in range(EXAMPLES)]


def _spec(tiny_llama, objective: Objective, method: str, kind: str | None) -> JobSpec:
    fmt = {Objective.sft: "alpaca", Objective.kto: "kto"}.get(objective, "preference")
    options = {objective.value: {"reference": kind}} if objective.needs_reference else {}
    return JobSpec(base_model=str(tiny_llama), dataset={"path": "x.jsonl"}, method=method, objective=objective,
                   dataset_format=fmt, **options)  # fmt: skip


def _model(tiny_llama, method: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model


def _recording(tiny_llama, calls: list[tuple[int, bool]]):
    """The worker's collate, noting how many rows each forward gets and whether it runs with grad."""
    tokenizer = data.load_tokenizer(tiny_llama)

    def collate(rows):
        calls.append((len(rows), torch.is_grad_enabled()))
        return data.collate(rows, tokenizer.pad_token_id, torch.device("cpu"))

    return collate


def _rows_per_example(calls: list[tuple[int, bool]], grad: bool) -> int:
    rows = sum(count for count, with_grad in calls if with_grad is grad)
    assert rows % EXAMPLES == 0
    return rows // EXAMPLES


def _one_micro_batch(tiny_llama, objective: Objective, method: str, kind: str | None) -> list[tuple[int, bool]]:
    """The collate calls of one micro-batch's loss, with the reference `kind` built as the recipe builds it."""
    spec = _spec(tiny_llama, objective, method, kind)
    model, rows, calls = _model(tiny_llama, method), _rows(objective), []
    table = reference.Precomputed(torch.zeros(EXAMPLES, 2))
    ref = reference.build_reference(kind, model, fused=False, precomputed=table) if kind else None
    build_objective(spec, fused=False, reference=ref).loss(model, _recording(tiny_llama, calls), rows,
                                                           totals([rows]), Stats())  # fmt: skip
    return calls


def test_the_worker_and_the_planner_know_the_same_objectives():
    assert set(OBJECTIVES) == set(Objective) == set(OBJECTIVE_TRAITS)


@pytest.mark.parametrize("objective", list(Objective))
def test_the_policy_runs_the_rows_the_planner_counts(tiny_llama, objective):
    """A precomputed reference (or none) runs no forward: what is counted is the policy's own."""
    kind = "precomputed" if objective.needs_reference else None
    calls = _one_micro_batch(tiny_llama, objective, "lora", kind)
    traits = OBJECTIVE_TRAITS[objective]
    assert _rows_per_example(calls, grad=True) == traits.grad_rows
    assert _rows_per_example(calls, grad=False) == traits.no_grad_rows
    assert sum(1 for _, with_grad in calls if with_grad) == 1  # both sequences of a pair in one forward


@pytest.mark.parametrize(
    "objective, method, kind",
    [
        (Objective.dpo, "lora", "adapter_disabled"),
        (Objective.dpo, "full", "copy"),
        (Objective.kto, "lora", "adapter_disabled"),
        (Objective.kto, "full", "copy"),
    ],
)
def test_a_per_step_reference_scores_the_rows_the_planner_counts_under_no_grad(tiny_llama, objective, method, kind):
    calls = _one_micro_batch(tiny_llama, objective, method, kind)
    traits = OBJECTIVE_TRAITS[objective]
    assert REFERENCES[kind].per_step
    assert _rows_per_example(calls, grad=True) == traits.grad_rows
    assert _rows_per_example(calls, grad=False) == traits.no_grad_rows + traits.reference_rows
    assert calls[0][1] and not calls[-1][1]  # the policy's forward first, the reference's after it (before backward)


@pytest.mark.parametrize("objective", [o for o in Objective if o.needs_reference])
def test_the_precompute_pass_scores_the_reference_rows_under_no_grad(tiny_llama, tmp_path, objective):
    assert REFERENCES["precomputed"].precomputes and not REFERENCES["precomputed"].per_step
    model, calls = _model(tiny_llama, "lora"), []
    reference.load_or_precompute(
        tmp_path / reference.REFERENCE_FILE,
        model,
        _rows(objective),
        micro_batch_size=EXAMPLES,
        collate=_recording(tiny_llama, calls),
        autocast=torch.autocast("cpu", enabled=False),
        fused=False,
    )
    assert calls == [(OBJECTIVE_TRAITS[objective].reference_rows * EXAMPLES, False)]


def test_only_a_copied_reference_holds_the_models_weights_again(tiny_llama):
    model = _model(tiny_llama, "full")
    copied = reference.build_reference("copy", model, fused=False)
    stored = {p.data_ptr() for p in model.parameters()}
    assert REFERENCES["copy"].copies_weights and isinstance(copied, reference.FrozenCopy)
    assert sum(p.numel() * p.element_size() for p in copied.model.parameters()) == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    assert stored.isdisjoint(p.data_ptr() for p in copied.model.parameters())
    adapters = reference.build_reference("adapter_disabled", _model(tiny_llama, "lora"), fused=False)
    assert not REFERENCES["adapter_disabled"].copies_weights and not vars(adapters).get("model")
