"""Suggestions for a spec that does not fit: each candidate is a JSON merge-patch that the planner re-plans;
only patches that fit are offered, cheapest expected throughput cost first.

Costs are rough slowdowns of tokens/s (the calibration rows give two of them), plus a penalty for patches
that change what the job trains (method, sequence length) so they come after the ones that do not.
"""

from __future__ import annotations

from typing import Any

from domain.spec import JobSpec, Optimizer, Reference
from planner.core import Outcome, Recipe, Suggestion, apply_patch, evaluate
from planner.methods import METHODS
from planner.objectives import REFERENCES
from planner.optimizers import OPTIMIZERS
from planner.shapes import ModelShape

# Expected throughput cost (fraction of tokens/s lost), cheapest first.
COST_FUSED_LOSS = 0.0  # the chunked lm_head + loss recomputes one small matmul per chunk: about free
COST_ADAMW_8BIT = 0.02  # q05-full16: adamw_bnb_8bit 20.6k vs adamw 22.3k tok/s (noise-level on 6 steps)
COST_PAGED = 0.04  # paged states add page migration under memory pressure
COST_GALORE = 0.1  # NOT MEASURED: projections every step and an SVD per weight every update_proj_gap steps
COST_BF16_PRECISION = 0.0  # bf16 weights drop the fp32 master copy: faster, but less exact updates
COST_PER_HALVING = 0.05  # smaller matmuls per halving of the micro-batch (same tokens per step)
COST_CHECKPOINTING = 0.5  # q05-lora: gc 10.8k vs no gc 22.1k tok/s
COST_QLORA = 0.8  # q05: qlora-gc 7.2k vs lora-gc 10.8k tok/s (0.34) + changes the trained model (NF4 base)
COST_LORA = 0.9  # changes what trains (adapters instead of all weights)
# NOT MEASURED: still a full fine-tune, but one block of layers moves per step (the BAdam paper: close to Adam's
# loss per step on Llama 2 7B); backward skips the frozen layers' weight grads, so a step is no slower.
COST_BADAM = 0.3
COST_SHORTER_SEQ = 2.0  # changes the data the job sees: always last
# NOT MEASURED: padding-free batches compute no padding and build no mask (FlashAttention varlen on CUDA).
COST_PADDING_FREE = 0.0
# NOT MEASURED: the saved tensors go to the host and back every step, on the compute stream (no overlap):
# about what gradient checkpointing's recompute costs, so offered after it.
COST_OFFLOAD_ACTIVATIONS = 0.6
# NOT MEASURED: sharding over more GPUs costs their time and the all-gathers/reduce-scatters that do not overlap;
# zero3 all-gathers every layer again in backward. Offered after the single-GPU changes that keep the job as it is.
COST_SHARD_PER_DOUBLING = 0.3
COST_ZERO3_EXTRA = 0.05
COST_OFFLOAD = {"optimizer": 0.6, "params": 1.2}  # NOT MEASURED: PCIe traffic of the states / params every step
# Switching to an optimizer from its entry's alternatives: (cost, what the description adds after the name).
_OPTIMIZER_SWITCHES: dict[Optimizer, tuple[float, str]] = {
    Optimizer.adamw_8bit: (COST_ADAMW_8BIT, ""),
    Optimizer.galore_adamw_8bit: (COST_ADAMW_8BIT, " (CUDA workers)"),
    Optimizer.paged_adamw_8bit: (COST_PAGED, " (states in unified memory)"),
    Optimizer.galore_adamw: (COST_GALORE, " (Adam states on rank-128 projections of the layers' weights)"),
    Optimizer.badam: (
        COST_BADAM,
        " (block-coordinate Adam: one decoder layer at a time trains, switched every 50 steps)",
    ),
}
# Switching dpo's / kto's reference to one of its entry's alternatives: (cost, what the description adds). NOT
# MEASURED: a precomputed reference is one no-grad forward per example before step 1 instead of one per example per
# step, and the same untrained model scores the same sequences, so the job learns the same; no slower.
_REFERENCE_SWITCHES: dict[Reference, tuple[float, str]] = {
    "precomputed": (0.0, " (a first pass scores every example before step 1: no reference forward per step, no copy)"),
}

Candidate = tuple[float, str, dict[str, Any]]


def sharding_patch(spec: JobSpec, num_gpus: int, sharding: str) -> dict[str, Any] | None:
    """resources.num_gpus/sharding, with the optimizer swapped for adamw where FSDP2 cannot step it; None where the
    spec cannot shard at all (qlora with 8-bit weights)."""
    quant = spec.quantization_options
    if METHODS[spec.method].quantized and quant is not None and quant.bits == 8:
        return None
    patch: dict[str, Any] = {"resources": {"num_gpus": num_gpus, "sharding": sharding}}
    if not OPTIMIZERS[spec.memory.optimizer].shards:  # domain/spec.py JobSpec._sharding_problems
        patch["memory"] = {"optimizer": "adamw"}
        if spec.galore is not None:
            patch["galore"] = None
    return patch


def _sharding_candidates(spec: JobSpec, max_num_gpus: int) -> list[Candidate]:
    """More GPUs of one worker (2, 4, 8 up to what a worker has), zero2 and zero3; offload when already sharded."""
    res = spec.resources
    out: list[Candidate] = []
    current = res.effective_sharding.value if res.effective_sharding else None
    for n in (2, 4, 8):
        for sharding in ("zero2", "zero3"):
            if n > max_num_gpus or (n < res.num_gpus) or (n == res.num_gpus and sharding == current):
                continue
            patch = sharding_patch(spec, n, sharding)
            if patch is None:
                continue
            cost = COST_SHARD_PER_DOUBLING * (n.bit_length() - 1) + (COST_ZERO3_EXTRA if sharding == "zero3" else 0)
            swap = f", optimizer {spec.memory.optimizer.value}→adamw" if "memory" in patch else ""
            out.append((cost, f"num_gpus {res.num_gpus}→{n} with {sharding} (FSDP2){swap}", patch))
    if current:
        for offload in ("optimizer", "params"):
            if res.offload.value == "none" or (res.offload.value == "optimizer" and offload == "params"):
                out.append(
                    (COST_OFFLOAD[offload], f"offload {offload} to host memory", {"resources": {"offload": offload}})
                )
    return out


def _candidates(spec: JobSpec, shape: ModelShape, mb: int, max_num_gpus: int = 1) -> list[Candidate]:
    """Every single patch worth re-planning, cheapest first (sorted is stable: equal costs keep this order)."""
    out = _sharding_candidates(spec, max_num_gpus)
    if spec.memory.fused_loss is False:  # None (the default) is already on for the worker
        out.append(
            (
                COST_FUSED_LOSS,
                "fused_loss on (chunked lm_head + cross-entropy: the full fp32 logits are never held)",
                {"memory": {"fused_loss": True}},
            )
        )
    out += _reference_candidates(spec)
    out += _optimizer_candidates(spec)
    if METHODS[spec.method].trains == "all" and spec.memory.precision.value == "bf16-mixed":
        out.append(
            (
                COST_BF16_PRECISION,
                "precision bf16-mixed→bf16 (no fp32 master weights)",
                {"memory": {"precision": "bf16"}},
            )
        )
    out += _micro_batch_candidates(spec, mb)
    out += _batch_layout_candidates(spec, shape, mb)
    if not spec.memory.gradient_checkpointing:
        out.append((COST_CHECKPOINTING, "gradient_checkpointing on", {"memory": {"gradient_checkpointing": True}}))
    if not spec.memory.offload_activations and spec.resources.effective_sharding is None:
        out.append(
            (
                COST_OFFLOAD_ACTIVATIONS,
                "offload_activations on (the saved tensors wait in host memory; one layer's stay on the GPU)",
                {"memory": {"offload_activations": True}},
            )
        )
    out += _method_candidates(spec)
    out += _sequence_candidates(spec)
    return sorted(out, key=lambda c: c[0])


def _batch_layout_candidates(spec: JobSpec, shape: ModelShape, mb: int) -> list[Candidate]:
    """Padding-free batches where a mask would be built (padded micro-batches > 1, or packed rows), on models
    whose attention the varlen path computes (planner/scope.py padding_free_problem)."""
    if spec.training.padding_free or shape.attention_softcapping is not None:
        return []
    if not (spec.training.packing or mb > 1):
        return []
    patch = {"training": {"padding_free": True}}
    return [(COST_PADDING_FREE, "padding_free on (one row per micro-batch: no padding, no attention mask)", patch)]


def _galore_off(spec: JobSpec) -> dict[str, Any]:
    """The galore section goes with a switch away from a GaLore optimizer: its options need one."""
    return {"galore": None} if spec.galore is not None else {}


def _optimizer_candidates(spec: JobSpec) -> list[Candidate]:
    """The current optimizer's registry alternatives; GaLore ones only where base weights train (it projects
    them)."""
    current = spec.memory.optimizer
    out: list[Candidate] = []
    for target in OPTIMIZERS[current].alternatives:
        if OPTIMIZERS[target].galore and not METHODS[spec.method].trains_base:
            continue
        cost, detail = _OPTIMIZER_SWITCHES[target]
        patch: dict[str, Any] = {"memory": {"optimizer": target.value}}
        if not OPTIMIZERS[target].galore:
            patch |= _galore_off(spec)
        out.append((cost, f"optimizer {current.value}→{target.value}{detail}", patch))
    return out


def _reference_candidates(spec: JobSpec) -> list[Candidate]:
    """The resolved reference's registry alternatives (dpo, kto): the same log-probabilities in less memory."""
    current, name = spec.reference, spec.objective.value
    if current is None:
        return []
    out: list[Candidate] = []
    for target in REFERENCES[current].alternatives:
        cost, detail = _REFERENCE_SWITCHES[target]
        out.append((cost, f"{name}.reference {current}→{target}{detail}", {name: {"reference": target}}))
    return out


def _micro_batch_candidates(spec: JobSpec, mb: int) -> list[Candidate]:
    """Each divisor of the micro-batch, with the accumulation that keeps the effective batch."""
    if spec.training.micro_batch_size == "auto":
        return []
    out: list[Candidate] = []
    for smaller in (d for d in range(mb - 1, 0, -1) if mb % d == 0):
        factor = mb // smaller
        out.append(
            (
                COST_PER_HALVING * factor.bit_length(),
                f"micro_batch_size {mb}→{smaller} with gradient_accumulation_steps ×{factor} (same effective batch)",
                {
                    "training": {
                        "micro_batch_size": smaller,
                        "gradient_accumulation_steps": spec.training.gradient_accumulation_steps * factor,
                    }
                },
            )
        )
    return out


def _method_candidates(spec: JobSpec) -> list[Candidate]:
    """Cheaper methods: unquantized adapters → a quantized base; trained base weights → LoRA adapters."""
    traits = METHODS[spec.method]
    out: list[Candidate] = []
    if traits.adapters and not traits.quantized:
        out.append((COST_QLORA, f"method {spec.method.value}→qlora (NF4 base weights)", {"method": "qlora"}))
    if traits.trains_base:
        patch: dict[str, Any] = {"method": "lora", "freeze": None}
        detail = ""
        if OPTIMIZERS[spec.memory.optimizer].galore:
            patch |= {"memory": {"optimizer": "adamw"}, **_galore_off(spec)}
        if spec.reference == "copy":  # lora has its reference already: its base with the adapters off
            patch[spec.objective.value] = {"reference": "adapter_disabled"}
            detail = f", {spec.objective.value}.reference copy→adapter_disabled (the base with its adapters off)"
        out.append((COST_LORA, f"method {spec.method.value}→lora{detail}", patch))
    return out


def _sequence_candidates(spec: JobSpec) -> list[Candidate]:
    seq = spec.training.max_seq_length
    return [
        (
            COST_SHORTER_SEQ + seq / shorter / 100,
            f"max_seq_length {seq}→{shorter} (changes the job)",
            {"training": {"max_seq_length": shorter}},
        )
        for shorter in (seq // 2, seq // 4, seq // 8)
        if shorter >= 256
    ]


def suggestions(
    spec: JobSpec, shape: ModelShape, gpu: int, mb: int, recipe: Recipe, max_num_gpus: int = 1
) -> list[Suggestion]:
    """Single patches that fit; if none does, one combined patch built greedily in cost order. Sharding patches
    only up to max_num_gpus (the most GPUs one worker has)."""
    found: list[Suggestion] = []
    offered_mb = offered_seq = False
    candidates = _candidates(spec, shape, mb, max_num_gpus)
    for _, description, patch in candidates:
        is_mb, is_seq = "micro_batch_size" in patch.get("training", {}), "max_seq_length" in patch.get("training", {})
        if (is_mb and offered_mb) or (is_seq and offered_seq):
            continue  # the largest micro-batch / longest sequence that fits is enough
        result = _try(spec, shape, gpu, patch, recipe)
        if result is not None and result.fits:
            found.append(_suggestion(description, patch, result))
            offered_mb, offered_seq = offered_mb or is_mb, offered_seq or is_seq
    return found or _combined(spec, shape, gpu, candidates, recipe)


Step = tuple[str, dict[str, Any]]  # (description, patch)


def _combined(
    spec: JobSpec, shape: ModelShape, gpu: int, candidates: list[Candidate], recipe: Recipe
) -> list[Suggestion]:
    """Add patches in cost order until the spec fits, then drop the ones it does not need; offer that one.
    A switch to GaLore is left out: it would replace the cheaper optimizer steps and then bar method→lora."""
    steps: list[Step] = []
    for _, description, patch in candidates:
        if _turns_on_galore(spec, patch):
            continue
        # a later patch of the same field (paged after 8-bit, a smaller micro-batch) replaces the earlier one
        trial = [(d, p) for d, p in steps if _leaves(p) - _leaves(patch)] + [(description, patch)]
        result = _try(spec, shape, gpu, _merge_all(trial), recipe)
        if result is None:
            continue
        steps = trial
        if result.fits:
            return [_prune(spec, shape, gpu, steps, result, recipe)]
    return []


def smallest_fit(spec: JobSpec, shape: ModelShape, gpu: int, peak: int, recipe: Recipe) -> tuple[int, int | None]:
    """When nothing fits: (the smallest GPU memory the spec fits on as it is: peak + max(5%, 1 GiB), rounded up to a
    GiB; the fewest GPUs of `gpu` bytes, at most 8, on which it fits with zero3, or None)."""
    from planner.core import MARGIN_FLOOR_BYTES, MARGIN_FRACTION

    need = max(peak + MARGIN_FLOOR_BYTES, -(-peak * 100 // int(round((1 - MARGIN_FRACTION) * 100))))
    need = -(-need // 2**30) * 2**30
    for n in range(max(2, spec.resources.num_gpus), 9):
        patch = sharding_patch(spec, n, "zero3")
        result = _try(spec, shape, gpu, patch, recipe) if patch else None
        if result is not None and result.fits:
            return need, n
    return need, None


def _turns_on_galore(spec: JobSpec, patch: dict[str, Any]) -> bool:
    target = patch.get("memory", {}).get("optimizer")
    return target is not None and OPTIMIZERS[Optimizer(target)].galore and not OPTIMIZERS[spec.memory.optimizer].galore


def _prune(
    spec: JobSpec, shape: ModelShape, gpu: int, steps: list[Step], result: Outcome, recipe: Recipe
) -> Suggestion:
    """Drop, most expensive first, every earlier step the combination still fits without."""
    for step in reversed(steps[:-1]):
        fewer = [s for s in steps if s is not step]
        trial = _try(spec, shape, gpu, _merge_all(fewer), recipe)
        if trial is not None and trial.fits:
            steps, result = fewer, trial
    return _suggestion("; ".join(d for d, _ in steps), _merge_all(steps), result)


def _leaves(patch: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in patch.items():
        out |= _leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


def _merge_all(steps: list[Step]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for _, patch in steps:
        merged = _merge(merged, patch)
    return merged


def _suggestion(description: str, patch: dict[str, Any], result: Outcome) -> Suggestion:
    if result.headroom is None:  # every suggestion is planned against the GPU it should fit on
        raise ValueError("a suggestion is planned against a known GPU")
    return Suggestion(description=description, patch=patch, peak_vram_bytes=result.peak, headroom_bytes=result.headroom)


def _try(spec: JobSpec, shape: ModelShape, gpu: int, patch: dict[str, Any], recipe: Recipe) -> Outcome | None:
    try:
        patched = apply_patch(spec, patch)
    except ValueError:  # the patch makes an invalid spec (e.g. options of another method)
        return None
    return evaluate(patched, shape, gpu, recipe)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
