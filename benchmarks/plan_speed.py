"""How long planning one spec takes (budget: 5 ms, suggestions and 'auto' included).

    python benchmarks/plan_speed.py

A benchmark, not a test: it prints a table and exits 1 only if a median is over the budget.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.spec import JobSpec  # noqa: E402
from planner import core, plan  # noqa: E402
from planner.catalog import find_model  # noqa: E402

BUDGET_MS = 5.0
GIB = 2**30
CASES = [
    ("qlora 7B fits", "Qwen/Qwen2.5-7B", {"method": "qlora"}, 80),
    ("lora 8B fits", "meta-llama/Llama-3.1-8B", {"method": "lora"}, 80),
    ("full 0.5B fits", "Qwen/Qwen2.5-0.5B", {"method": "full"}, 80),
    ("qlora 72B auto", "Qwen/Qwen2.5-72B", {"method": "qlora", "training": {"micro_batch_size": "auto"}}, 80),
    (
        "lora 14B auto 8k",
        "Qwen/Qwen2.5-14B",
        {"method": "lora", "training": {"micro_batch_size": "auto", "max_seq_length": 8192}},
        80,
    ),
    (
        "full 7B no fit (suggest)",
        "Qwen/Qwen2.5-7B",
        {"method": "full", "training": {"micro_batch_size": 8, "max_seq_length": 4096}},
        80,
    ),
    (
        "lora 9B no gc no fit (suggest)",
        "google/gemma-2-9b",
        {"method": "lora", "memory": {"gradient_checkpointing": False}, "training": {"micro_batch_size": 16}},
        24,
    ),
    ("full 32B no fit (suggest)", "Qwen/Qwen2.5-32B", {"method": "full"}, 24),
    (
        "gemma 27B auto 16k no fit (suggest)",
        "google/gemma-2-27b",
        {
            "method": "lora",
            "memory": {"gradient_checkpointing": False},
            "training": {"micro_batch_size": "auto", "max_seq_length": 16384},
        },
        80,
    ),
    ("freeze 3B no GPU", "meta-llama/Llama-3.2-3B", {"method": "freeze"}, None),
]


def time_case(spec: JobSpec, shape, gpu: int | None, repeats: int = 50, cold: bool = False) -> list[float]:
    plan(spec, shape, gpu)  # warm caches (catalog, pydantic)
    samples = []
    for _ in range(repeats):
        if cold:  # the planner's cache of micro-batch-independent terms, as for a never-seen spec
            core._FIXED_CACHE.clear()
        start = time.perf_counter()
        plan(spec, shape, gpu)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> int:
    print("| case | model | GPU GiB | fits | suggestions | median ms | p95 ms | cold median ms |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    worst = 0.0
    for label, model, body, gpu_gib in CASES:
        spec = JobSpec.model_validate({"base_model": model, **body})
        shape, gpu = find_model(model), gpu_gib and gpu_gib * GIB
        samples = sorted(time_case(spec, shape, gpu))
        result = plan(spec, shape, gpu)
        cold = statistics.median(time_case(spec, shape, gpu, cold=True))
        median, p95 = statistics.median(samples), samples[int(0.95 * len(samples)) - 1]
        worst = max(worst, median, cold)
        print(
            f"| {label} | {model} | {gpu_gib or '-'} | {result.fits} | {len(result.suggestions)} "
            f"| {median:.2f} | {p95:.2f} | {cold:.2f} |"
        )
    print(f"\nworst median {worst:.2f} ms (budget {BUDGET_MS} ms): {'OK' if worst <= BUDGET_MS else 'OVER BUDGET'}")
    return 0 if worst <= BUDGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
