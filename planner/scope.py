"""What the planner refuses to plan for a spec on a model: every problem at once, each with a stable code.

ModelShape.from_config already refuses what the planner does not model (unsupported_architecture,
unsupported_quantization); these are the spec-against-model checks that need both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from domain.spec import JobSpec
from planner.shapes import Linear, ModelShape


@dataclass(frozen=True, slots=True)
class Problem:
    code: str  # invalid_lora_targets | sequence_too_long | unsupported_padding_free
    detail: str


class PlanRefused(ValueError):
    """The spec cannot be planned on this model; `problems` holds every reason (the first one's code leads)."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(p.detail for p in problems))
        self.problems = problems
        self.code = problems[0].code


# peft BaseTuner._check_target_module_exists: a string target matches a module whose full name equals it or ends
# with "." + it. Full names here: model.layers.<i>.<parent>.<name>.
_LAYER_PREFIX = re.compile(r"^(?:model\.)?(?:layers\.(\d+)\.)?")


def target_matches(target: str, lin: Linear, num_layers: int) -> bool:
    """peft's suffix match of one target_modules entry against a decoder layer's nn.Linear (layers.N: any layer
    below num_layers; the planner then adapts every layer, an overestimate)."""
    match = _LAYER_PREFIX.match(target)
    assert match is not None  # both groups are optional: the pattern matches every string
    layer, rest = match.group(1), target[match.end() :]
    if layer is not None and int(layer) >= num_layers:
        return False
    return rest in (lin.name, f"{lin.parent}.{lin.name}") or f"{lin.parent}.{lin.name}".endswith("." + rest)


def lora_target_problem(spec: JobSpec, shape: ModelShape) -> Problem | None:
    """Every listed target must name an nn.Linear of the decoder layers, as peft would match it; peft would fail
    later (a non-Linear module) or adapt nothing (a typo, c_attn on a llama)."""
    lora = spec.lora_options
    if lora is None or lora.target_modules == "all-linear":
        return None
    leaves = {lin.name for lin in shape.linears}
    bad = [
        target
        for target in lora.target_modules
        if not any(target_matches(target, lin, shape.num_layers) for lin in shape.linears)
    ]
    if not bad:
        return None
    experts = (
        " (MoE experts are 3-D parameters, not nn.Linear: target_modules cannot adapt them)"
        if shape.num_experts
        else ""
    )
    return Problem(
        "invalid_lora_targets",
        f"lora.target_modules {bad} match no nn.Linear of {shape.model_type} {shape.name!r}{experts}; "
        f"its projections are: {', '.join(sorted(leaves))}",
    )


def sequence_problem(spec: JobSpec, shape: ModelShape) -> Problem | None:
    """max_seq_length beyond the context the model's rotary embedding is configured for (with rope scaling)."""
    seq = spec.training.max_seq_length
    if shape.context_length is None or seq <= shape.context_length:
        return None
    return Problem(
        "sequence_too_long",
        f"training.max_seq_length {seq} exceeds {shape.name!r}'s context length {shape.context_length} "
        "(max_position_embeddings, with its rope_scaling): shorten it or use a rope-scaled config",
    )


def padding_free_problem(spec: JobSpec, shape: ModelShape) -> Problem | None:
    """The varlen attention of padding-free batches (worker/training/attention.py) has no score soft-capping."""
    if not spec.training.padding_free or shape.attention_softcapping is None:
        return None
    return Problem(
        "unsupported_padding_free",
        f"training.padding_free: {shape.model_type} {shape.name!r} soft-caps its attention scores "
        f"(attn_logit_softcapping {shape.attention_softcapping}), which the varlen attention does not apply; "
        "turn padding_free off (packing still works, with a mask)",
    )


def check_scope(spec: JobSpec, shape: ModelShape) -> None:
    """Raise PlanRefused with every problem, or return."""
    checks = (lora_target_problem(spec, shape), sequence_problem(spec, shape), padding_free_problem(spec, shape))
    problems = [p for p in checks if p is not None]
    if problems:
        raise PlanRefused(problems)
