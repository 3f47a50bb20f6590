"""plan(spec, shape, gpu_memory_bytes) -> Plan: the predicted peak (planner/core.py), and when it does not fit, the
reasons and the cheaper specs that do (planner/suggest.py)."""

from __future__ import annotations

from domain.spec import JobSpec
from planner import fsdp, policy
from planner import terms as t
from planner.core import WORKER, Plan, Recipe, build_setup, evaluate
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
) -> Plan:
    """Predict the peak (one rank's when sharded) and, when it does not fit, offer cheaper specs that do; when
    none does, name the smallest GPU and GPU count that would. Refuses (scope.PlanRefused) a spec it cannot plan
    on this model. gpu_memory_bytes None: spec.resources.gpu_memory_gib is used when set, else no GPU is known
    (fits None, and micro_batch_size "auto" resolves to 1). max_num_gpus: the most GPUs one worker has
    (sharding suggestions go up to it). allocator_conf: PYTORCH_CUDA_ALLOC_CONF as the training process will see
    it, when the caller knows it (None: the worker's own setting)."""
    check_scope(spec, shape)
    o = evaluate(spec, shape, gpu_memory_bytes, recipe)
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
    )
    if result.sharding:
        result.sharded_terms = [
            k for k in fsdp.sharded_term_names(build_setup(spec, shape, 1, recipe)) if k in o.breakdown
        ]
    if o.fits is False and o.gpu is not None:  # fits is None without a GPU
        result.reasons = _reasons(o.breakdown, o.peak, o.gpu, o.margin, o.phase)
        if suggest:
            result.suggestions = suggestions(spec, shape, o.gpu, o.micro_batch, recipe, max_num_gpus)
            if not result.suggestions:
                need, result.min_num_gpus = smallest_fit(spec, shape, o.gpu, o.peak, recipe)
                result.min_gpu_memory_bytes = need
                result.reasons.append(_nothing_fits_reason(o.gpu, need, result.min_num_gpus, max_num_gpus))
    return result


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
