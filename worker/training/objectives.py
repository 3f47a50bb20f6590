"""What a training step minimises (spec.objective), one registry entry each: sft, dpo, kto, orpo.

Every objective turns a global step's micro-batches into one loss the recipe backpropagates, so every method,
optimizer, memory option, checkpoint and resume path runs under it unchanged. An objective gives:
  totals(window)         the denominators of the whole global step (as SFT divides by the step's learned tokens),
                         so accumulating micro-batches equals one big batch
  loss(model, rows, t)   a micro-batch's share of the step loss, and its metrics (rewards, accuracy) as sums

Preference objectives score whole completions: `sequence_logps` sums each sequence's learned (completion) token
log-probabilities. DPO and KTO compare them with a reference policy's (worker/training/reference.py). The losses
are TRL 1.16's (trl.DPOTrainer, trl.KTOTrainer, trl.experimental.orpo.ORPOTrainer); tests/worker/
test_preference_parity.py computes both on one batch. One difference, on purpose: ORPO's NLL term here covers the
chosen completion's tokens, as every other loss in ftjobs does; TRL's covers the prompt too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from domain.spec import JobSpec, Objective
from worker.training import data
from worker.training.loss import loss_sum, sequence_logps

Collate = Callable[[Sequence[data.TokenizedExample]], dict]


@dataclass(frozen=True)
class Totals:
    """A global step's denominators."""

    learned_tokens: int  # SFT: the per-token loss
    examples: int  # pairs (dpo, orpo) or labelled completions (kto): their mean loss
    first_tokens: int  # orpo: the chosen completions' tokens, for its NLL term


def totals(window: Sequence[Sequence]) -> Totals:
    rows = [example for micro in window for example in micro]
    first = [example.sequences[0].learned_tokens for example in rows if not isinstance(example, data.TokenizedExample)]
    return Totals(sum(example.learned_tokens for example in rows), len(rows), sum(first))


@dataclass
class Stats:
    """Running sums of what preference tuning is watched by, kept on the device (no sync per micro-step)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float().sum()
            self.sums[name] = self.sums[name] + value if name in self.sums else value

    def report(self) -> dict[str, float] | None:
        """Means since the last report: rewards (beta x the policy/reference log-ratio), margin, accuracy, kl."""
        if not self.sums:
            return None
        sums = {name: value.item() for name, value in self.sums.items()}
        self.sums.clear()
        report = {}
        for name in ("chosen_reward", "rejected_reward", "margin", "accuracy", "kl"):
            count = sums.get(f"{name}_count", sums.get("pairs"))
            if name in sums and count:
                report[name] = sums[name] / count
        if "margin" not in report and "chosen_reward" in report and "rejected_reward" in report:
            report["margin"] = report["chosen_reward"] - report["rejected_reward"]
        return report


class Sft:
    """The assistant (or all) tokens' cross-entropy, per learned token of the step."""

    def __init__(self, spec: JobSpec, fused: bool, reference=None):
        self.fused = fused

    def loss(self, model, collate: Collate, rows, step: Totals, stats: Stats) -> torch.Tensor:
        return loss_sum(model, collate(rows), fused=self.fused) / step.learned_tokens


class _Scored:
    """Shared by the preference objectives: both sequences of every example in one forward."""

    def __init__(self, spec: JobSpec, fused: bool, reference=None):
        self.fused = fused
        self.reference = reference

    def logps(self, model, collate: Collate, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """[2, N] summed completion log-probabilities (first sequences, then second ones) and token counts."""
        sums, tokens = sequence_logps(model, collate(data.first_rows(rows) + data.second_rows(rows)), fused=self.fused)
        return sums.view(2, len(rows)), tokens.view(2, len(rows))


class Dpo(_Scored):
    """-log sigmoid(beta x (chosen log-ratio - rejected log-ratio)), or IPO's (per-token delta - 1/(2 beta))^2."""

    def __init__(self, spec: JobSpec, fused: bool, reference=None):
        super().__init__(spec, fused, reference)
        self.options = spec.dpo_options

    def loss(self, model, collate: Collate, rows, step: Totals, stats: Stats) -> torch.Tensor:
        (chosen, rejected), tokens = self.logps(model, collate, rows)
        ref_chosen, ref_rejected = self.reference.logps(model, collate, rows)
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        beta = self.options.beta
        if self.options.loss_type == "ipo":
            delta = chosen_ratio / tokens[0].clamp(min=1) - rejected_ratio / tokens[1].clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        else:
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        _pair_stats(stats, beta * chosen_ratio, beta * rejected_ratio)
        return losses.sum() / step.examples


class Orpo(_Scored):
    """The chosen completions' NLL - beta x mean log sigmoid(log odds(chosen) - log odds(rejected)), the odds on
    the mean per-token probability. No reference."""

    def __init__(self, spec: JobSpec, fused: bool, reference=None):
        super().__init__(spec, fused)
        self.beta = spec.orpo_options.beta

    def loss(self, model, collate: Collate, rows, step: Totals, stats: Stats) -> torch.Tensor:
        sums, tokens = self.logps(model, collate, rows)
        chosen, rejected = sums[0] / tokens[0].clamp(min=1), sums[1] / tokens[1].clamp(min=1)
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        _pair_stats(stats, self.beta * chosen, self.beta * rejected)
        stats.add(log_odds=log_odds)
        return -sums[0].sum() / step.first_tokens - self.beta * F.logsigmoid(log_odds).sum() / step.examples


class Kto(_Scored):
    """desirable: 1 - sigmoid(beta x (log-ratio - KL)); undesirable: 1 - sigmoid(beta x (KL - log-ratio)); weighted,
    mean over the step's completions. KL: the micro-batch's mean policy/reference log-ratio on the mismatched
    sequences, detached, at least 0."""

    def __init__(self, spec: JobSpec, fused: bool, reference=None):
        super().__init__(spec, fused, reference)
        self.options = spec.kto_options

    def loss(self, model, collate: Collate, rows, step: Totals, stats: Stats) -> torch.Tensor:
        policy, _ = sequence_logps(model, collate(data.first_rows(rows)), fused=self.fused)
        with torch.no_grad():
            mismatched, _ = sequence_logps(model, collate(data.second_rows(rows)), fused=self.fused)
        ref_policy, ref_mismatched = self.reference.logps(model, collate, rows)
        kl = (mismatched - ref_mismatched).mean().clamp(min=0)
        ratio = policy - ref_policy
        desirable = torch.tensor([example.label for example in rows], device=ratio.device)
        beta, options = self.options.beta, self.options
        losses = torch.where(
            desirable,
            options.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
            options.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
        )
        rewards = (beta * ratio).detach()
        stats.add(
            chosen_reward=rewards[desirable],
            chosen_reward_count=desirable.float(),
            rejected_reward=rewards[~desirable],
            rejected_reward_count=(~desirable).float(),
            kl=kl,
            kl_count=torch.ones(()),
        )
        return losses.sum() / step.examples


def _pair_stats(stats: Stats, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
    stats.add(
        chosen_reward=chosen_rewards,
        rejected_reward=rejected_rewards,
        margin=chosen_rewards - rejected_rewards,
        accuracy=(chosen_rewards > rejected_rewards).float(),
        pairs=torch.ones_like(chosen_rewards),
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler, 2012), as TRL's."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


OBJECTIVES = {Objective.sft: Sft, Objective.dpo: Dpo, Objective.kto: Kto, Objective.orpo: Orpo}


def build_objective(spec: JobSpec, fused: bool, reference=None):
    return OBJECTIVES[spec.objective](spec, fused, reference)


@torch.no_grad()
def evaluate(objective, model, examples: Sequence, *, micro_batch_size: int, collate: Collate, autocast):
    """The held-out loss (per token for sft, per example for the preference objectives, dropout off) and the
    held-out preference accuracy (dpo, orpo: how often the chosen completion's reward is the higher one)."""
    was_training = model.training
    model.eval()
    stats, total = Stats(), 0.0
    everything = totals([examples])
    try:
        for start in range(0, len(examples), micro_batch_size):
            with autocast:
                total += objective.loss(model, collate, examples[start : start + micro_batch_size], everything, stats)
    finally:
        model.train(was_training)
    report = stats.report() or {}
    return float(total), report.get("accuracy")
