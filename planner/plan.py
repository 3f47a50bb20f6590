"""plan(spec, shape, gpu_memory_bytes) -> Plan: the predicted peak (planner/core.py), and when it does not fit, the
reasons and the cheaper specs that do (planner/suggest.py)."""

from __future__ import annotations

from dataclasses import replace

from domain.spec import JobSpec
from planner import fsdp, policy
from planner import terms as t
from planner.calibration import LEARNED_CORRECTION_TERM, Correction, LearnedCorrection, recipe_family
from planner.core import WORKER, Outcome, Plan, Recipe, Suggestion, apply_patch, build_setup, evaluate, safety_margin
from planner.scope import check_scope
from planner.shapes import ModelShape
from planner.suggest import smallest_fit, suggestions


def plan(
    spec: JobSpec,
    shape: ModelShape,
    gpu_memory_bytes: int | None = None,
    *,
    recipe: Recipe = WORKER,
    suggest: bool = True,
    max_num_gpus: int = 1,
    allocator_conf: str | None = None,
    correction: Correction | None = None,
) -> Plan:
    """Predict the peak (one rank's when sharded) and, when it does not fit, offer cheaper specs that do; when
    none does, name the smallest GPU and GPU count that would. Refuses (scope.PlanRefused) a spec it cannot plan
    on this model. gpu_memory_bytes None: spec.resources.gpu_memory_gib is used when set, else no GPU is known
    (fits None, and micro_batch_size "auto" resolves to 1). max_num_gpus: the most GPUs one worker has
    (sharding suggestions go up to it). allocator_conf: PYTORCH_CUDA_ALLOC_CONF as the training process will see
    it, when the caller knows it (None: the worker's own setting). correction: learned from finished jobs of
    this spec's recipe family (planner/calibration.py); None plans with the model alone."""
    check_scope(spec, shape)
    o, learned = _evaluate(spec, shape, gpu_memory_bytes, recipe, correction)
    result = Plan(
        peak_vram_bytes=o.peak,
        breakdown=o.breakdown,
        peak_phase=o.phase,
        phases=o.phases or {},
        paged_optimizer_bytes=o.paged,
        gpu_memory_bytes=o.gpu,
        safety_margin_bytes=o.margin,
        fits=o.fits,
        headroom_bytes=o.headroom,
        micro_batch_size=o.micro_batch,
        num_gpus=o.num_gpus,
        sharding=spec.resources.effective_sharding.value if spec.resources.effective_sharding else None,
        host_breakdown=o.host or {},
        host_memory_bytes=sum((o.host or {}).values()) * o.num_gpus,
        assumptions=_assumptions(recipe),
        warnings=_warnings(allocator_conf),
        learned_correction=learned,
    )
    if result.sharding:
        result.sharded_terms = [
            k for k in fsdp.sharded_term_names(build_setup(spec, shape, 1, recipe)) if k in o.breakdown
        ]
    if o.fits is False and o.gpu is not None:  # fits is None without a GPU
        result.reasons = _reasons(o.breakdown, o.peak, o.gpu, o.margin, o.phase)
        if suggest:
            budget = o.gpu if correction is None else int(o.gpu / correction.ratio)
            found = suggestions(spec, shape, budget, o.micro_batch, recipe, max_num_gpus)
            result.suggestions = [_on_the_gpu(spec, s, o.gpu, correction) for s in found]
            if not result.suggestions:
                need, result.min_num_gpus = smallest_fit(spec, shape, o.gpu, o.peak, recipe)
                result.min_gpu_memory_bytes = need
                result.reasons.append(_nothing_fits_reason(o.gpu, need, result.min_num_gpus, max_num_gpus))
    return result


def _evaluate(
    spec: JobSpec, shape: ModelShape, gpu_memory_bytes: int | None, recipe: Recipe, correction: Correction | None
) -> tuple[Outcome, LearnedCorrection | None]:
    """The model's outcome, with the correction's line added to every phase when one is given. A micro-batch
    "auto" is sized against the GPU divided by the ratio, so the corrected peak still fits: peak x ratio <=
    GPU - ratio x margin(GPU / ratio), and ratio x margin(GPU / ratio) >= margin(GPU) for ratio >= 1."""
    if correction is None:
        return evaluate(spec, shape, gpu_memory_bytes, recipe), None
    if correction.family != recipe_family(spec) or correction.ratio < 1.0:
        raise ValueError(f"a correction of family {correction.family} cannot apply to {recipe_family(spec)}")
    gpu = gpu_memory_bytes or (int(spec.resources.gpu_memory_gib * t.GIB) if spec.resources.gpu_memory_gib else None)
    if gpu is None or spec.training.micro_batch_size != "auto":
        o = evaluate(spec, shape, gpu, recipe)
    else:
        o = replace(evaluate(spec, shape, int(gpu / correction.ratio), recipe), gpu=gpu, margin=safety_margin(gpu))
    learned = LearnedCorrection(
        ratio=correction.ratio,
        jobs=correction.jobs,
        gpu_model=correction.gpu_model,
        family=correction.family,
        model_peak_vram_bytes=o.peak,
    )
    return _with_term(o, correction.ratio), learned


def _with_term(o: Outcome, ratio: float) -> Outcome:
    def line(terms: dict[str, int]) -> int:
        return round(sum(terms.values()) * (ratio - 1))

    breakdown = o.breakdown | {LEARNED_CORRECTION_TERM: line(o.breakdown)}
    phases = {name: terms | {LEARNED_CORRECTION_TERM: line(terms)} for name, terms in (o.phases or {}).items()}
    return replace(o, breakdown=breakdown, peak=sum(breakdown.values()), phases=phases or None)


def _on_the_gpu(spec: JobSpec, found: Suggestion, gpu: int, correction: Correction | None) -> Suggestion:
    """A suggestion found against GPU / ratio (so that it fits once corrected), restated against the GPU itself:
    corrected when the patched spec is still of the correction's family, the model's peak when it is not."""
    if correction is None:
        return found
    peak = found.peak_vram_bytes
    if recipe_family(apply_patch(spec, found.patch)) == correction.family:
        peak += round(peak * (correction.ratio - 1))  # as _with_term adds it
    return found.model_copy(update={"peak_vram_bytes": peak, "headroom_bytes": gpu - safety_margin(gpu) - peak})


def _assumptions(recipe: Recipe) -> dict[str, str]:
    out = {policy.ALLOCATOR_ENV: policy.ALLOCATOR_CONF} if recipe == WORKER else {}
    return out | {"calibrated_torch": policy.CALIBRATED_STACK["torch"]}


def _warnings(allocator_conf: str | None) -> list[str]:
    if allocator_conf is None or allocator_conf == policy.ALLOCATOR_CONF:
        return []
    return [
        f"{policy.ALLOCATOR_ENV} is {allocator_conf!r}, not the worker's {policy.ALLOCATOR_CONF!r}: the allocator "
        "fragmentation constants were fitted with expandable_segments:True, so the predicted peak may be off"
    ]


def _reasons(breakdown: dict[str, int], peak: int, gpu: int, margin: int, phase: str) -> list[str]:
    top = sorted(breakdown.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {v / t.GIB:.1f} GiB" for k, v in top)
    return [
        f"predicted peak {peak / t.GIB:.1f} GiB (at {phase}) + safety margin {margin / t.GIB:.1f} GiB "
        f"exceeds the GPU's {gpu / t.GIB:.1f} GiB by {(peak + margin - gpu) / t.GIB:.1f} GiB",
        f"largest terms: {parts}",
    ]


def _nothing_fits_reason(gpu_bytes: int, need: int, min_num_gpus: int | None, max_num_gpus: int) -> str:
    gpu = gpu_bytes / t.GIB
    text = (
        f"no single change or combination fits on {max_num_gpus} GPU(s) of {gpu:.1f} GiB: as specified the job "
        f"needs a GPU of at least {need / t.GIB:.0f} GiB"
    )
    if min_num_gpus:
        text += f", or {min_num_gpus} GPUs of {gpu:.1f} GiB with zero3 sharding"
    else:
        text += f"; even 8 GPUs of {gpu:.1f} GiB with zero3 do not fit it"
    return text
