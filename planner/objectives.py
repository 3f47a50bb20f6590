"""The objective registry, planner side: what each spec Objective runs per micro-batch, in rows and forwards, and
what each reference (spec.reference) costs. The memory terms (planner/terms.py) and phases (planner/core.py) test
these traits, never an objective's name. The worker's side is worker/training/objectives.py (OBJECTIVES: the
losses) and worker/training/reference.py (the references); tests/worker/test_objective_traits.py counts the rows
the worker's objectives build, with and without grad, and keeps them equal to these."""

from __future__ import annotations

from dataclasses import dataclass

from domain.spec import JobSpec, Objective, Reference


@dataclass(frozen=True, slots=True)
class ObjectiveTraits:
    """Rows per example of a micro-batch, each padded to the longest (planned at max_seq_length)."""

    grad_rows: int  # the policy's forward + backward: sft one row; dpo/orpo chosen and rejected in one forward
    no_grad_rows: int  # the policy again under torch.no_grad: kto's mismatched (prompt, next completion) rows
    reference_rows: int  # the reference policy scores these (dpo: both sequences; kto: completion + mismatched)

    @property
    def has_reference(self) -> bool:
        return self.reference_rows > 0


# worker/training/objectives.py: Sft.loss (loss_sum over the rows), _Scored.logps (first_rows + second_rows in one
# sequence_logps), Kto.loss (first_rows with grad, second_rows under no_grad), reference.py _both_sequences.
OBJECTIVES: dict[Objective, ObjectiveTraits] = {
    Objective.sft: ObjectiveTraits(grad_rows=1, no_grad_rows=0, reference_rows=0),
    Objective.dpo: ObjectiveTraits(grad_rows=2, no_grad_rows=0, reference_rows=2),
    Objective.kto: ObjectiveTraits(grad_rows=1, no_grad_rows=1, reference_rows=2),
    Objective.orpo: ObjectiveTraits(grad_rows=2, no_grad_rows=0, reference_rows=0),
}


@dataclass(frozen=True, slots=True)
class ReferenceTraits:
    """Where the reference's log-probabilities come from (worker/training/reference.py)."""

    per_step: bool  # a no-grad forward every micro-batch, after the policy's forward and before its backward
    copies_weights: bool  # a frozen deep copy of the loaded model sits beside it for the whole run
    precomputes: bool  # a first pass over the dataset before step 1: its own phase, then nothing per step
    alternatives: tuple[Reference, ...] = ()  # cheaper in memory, offered by planner/suggest.py in this order


REFERENCES: dict[Reference, ReferenceTraits] = {
    # AdapterDisabled: the same model under peft's disable_adapter, so no second copy
    "adapter_disabled": ReferenceTraits(
        per_step=True, copies_weights=False, precomputes=False, alternatives=("precomputed",)
    ),
    # FrozenCopy: copy.deepcopy(model), requires_grad_(False)
    "copy": ReferenceTraits(per_step=True, copies_weights=True, precomputes=False, alternatives=("precomputed",)),
    # load_or_precompute: before step 1 (the optimizer's states are allocated by its first step), then a table lookup
    "precomputed": ReferenceTraits(per_step=False, copies_weights=False, precomputes=True),
}


def objective_traits(spec: JobSpec) -> tuple[ObjectiveTraits, ReferenceTraits | None]:
    """This spec's objective entry and its resolved reference's (None: the objective has no reference)."""
    traits = OBJECTIVES[spec.objective]
    reference = spec.reference
    return traits, (REFERENCES[reference] if traits.has_reference and reference is not None else None)
