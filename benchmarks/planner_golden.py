"""The planner's predictions, frozen: a refactor of the planner must leave every figure byte-for-byte the same.

    python benchmarks/planner_golden.py --check     # compare with tests/planner/golden_predictions.json
    python benchmarks/planner_golden.py --write     # refresh it (only for a change that means to move figures)

Two sets of cases:
  calibration   every row of calibration/*.jsonl, planned as benchmarks/planner_accuracy.py plans it (its recipe),
                with no GPU and on 24 GiB and 80 GiB GPUs: the whole Plan, suggestions included, stored as it is
  grid          catalog models x methods x optimizers x precisions x checkpointing x GPU sizes: every valid spec's
                whole Plan, stored as the sha256 of its canonical JSON (the file stays small)
tests/planner/test_golden_predictions.py runs the comparison in the suite.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from planner_accuracy import _arch_table, load_rows, row_inputs  # noqa: E402

from domain.spec import JobSpec  # noqa: E402
from planner import plan  # noqa: E402
from planner.catalog import find_model  # noqa: E402
from planner.scope import PlanRefused  # noqa: E402

GOLDEN = ROOT / "tests" / "planner" / "golden_predictions.json"
# The golden file records the figures; what a plan says of its assumptions and warnings is not a prediction.
# phases: every phase's terms; the recorded breakdown is the peak one's, and a test keeps the two equal.
FIGURES_ONLY = {"assumptions", "warnings", "phases"}
GIB = 2**30
GPUS = (None, 24 * GIB, 80 * GIB)
GRID_MODELS = ("Qwen/Qwen2.5-0.5B", "meta-llama/Llama-2-7b-hf", "google/gemma-2-2b", "Qwen/Qwen1.5-MoE-A2.7B")
GRID_METHODS = ("qlora", "lora", "full", "freeze")
GRID_OPTIMIZERS = (
    "adamw",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adamw_4bit",
    "cpu_offload",
    "galore_adamw",
    "galore_adamw_8bit",
    "badam",
)
GRID_PRECISIONS = ("bf16-mixed", "bf16", "fp16-mixed")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def calibration_cases() -> dict[str, dict]:
    arch, out = _arch_table(), {}
    for row in load_rows():
        spec, shape, recipe = row_inputs(row, arch)
        for gpu in GPUS:
            out[f"{row['_file']}:{row['case']['name']}:{gpu}"] = plan(spec, shape, gpu, recipe=recipe).model_dump(
                mode="json", exclude=FIGURES_ONLY
            )
    return out


def grid_specs():
    for model, method, optimizer, precision, gc in itertools.product(
        GRID_MODELS, GRID_METHODS, GRID_OPTIMIZERS, GRID_PRECISIONS, (True, False)
    ):
        body = {
            "base_model": model,
            "method": method,
            "training": {"micro_batch_size": 2, "max_seq_length": 2048, "gradient_accumulation_steps": 2},
            "memory": {"precision": precision, "optimizer": optimizer, "gradient_checkpointing": gc},
        }
        try:
            yield f"{model}:{method}:{optimizer}:{precision}:{gc}", JobSpec.model_validate(body), find_model(model)
        except ValueError:
            continue  # a combination the spec refuses


# Options the grid's product leaves at their defaults, each on two models.
VARIANTS = {
    "dora": {"method": "lora", "lora": {"use_dora": True, "r": 64}},
    "lora-targets": {"method": "lora", "lora": {"target_modules": ["q_proj", "v_proj"], "dropout": 0}},
    "qlora-int8": {"method": "qlora", "quantization": {"bits": 8}},
    "qlora-fp4-nodq": {"method": "qlora", "quantization": {"quant_type": "fp4", "double_quant": False}},
    "freeze-modules": {"method": "freeze", "freeze": {"trainable_modules": ["mlp", "lm_head"]}},
    "freeze-layers": {"method": "freeze", "freeze": {"trainable_layers": 4}},
    "packing": {"method": "lora", "training": {"packing": True}},
    "unfused": {"method": "full", "memory": {"fused_loss": False}},
    "fp32": {"method": "full", "memory": {"precision": "fp32"}},
    "auto-batch": {"method": "lora", "training": {"micro_batch_size": "auto"}},
    "zero2": {"method": "full", "resources": {"num_gpus": 2, "sharding": "zero2"}},
    "zero3-offload-optimizer": {"method": "full", "resources": {"num_gpus": 4, "offload": "optimizer"}},
    "zero3-offload-params": {"method": "lora", "resources": {"num_gpus": 8, "offload": "params"}},
    "galore-right": {
        "method": "full",
        "memory": {"optimizer": "galore_adamw"},
        "galore": {"rank": 64, "proj_type": "right"},
    },
    "galore-full": {"method": "freeze", "memory": {"optimizer": "galore_adamw"}, "galore": {"proj_type": "full"}},
    "cpu-offload-accum": {
        "method": "full",
        "memory": {"optimizer": "cpu_offload"},
        "training": {"gradient_accumulation_steps": 4},
    },
    "loraplus-rslora": {"method": "lora", "lora": {"loraplus_lr_ratio": 16, "use_rslora": True}},
    "badam-blocks": {"method": "full", "memory": {"optimizer": "badam"}, "badam": {"layers_per_block": 4}},
}


def variant_specs():
    for (variant, body), model in itertools.product(VARIANTS.items(), ("Qwen/Qwen2.5-7B", "google/gemma-2-9b")):
        yield f"variant:{variant}:{model}", JobSpec.model_validate({"base_model": model, **body}), find_model(model)


def grid_cases() -> dict[str, str]:
    out = {}
    for name, spec, shape in itertools.chain(grid_specs(), variant_specs()):
        for gpu in GPUS:
            try:
                result = plan(spec, shape, gpu, max_num_gpus=8).model_dump(mode="json", exclude=FIGURES_ONLY)
            except PlanRefused as exc:
                result = {"refused": str(exc)}
            out[f"{name}:{gpu}"] = hashlib.sha256(_canonical(result).encode()).hexdigest()
    return out


def current() -> dict:
    return {"calibration": calibration_cases(), "grid": grid_cases()}


def differences(expected: dict, actual: dict) -> list[str]:
    out = []
    for section in ("calibration", "grid"):
        for key in sorted(expected[section].keys() | actual[section].keys()):
            if _canonical(expected[section].get(key)) != _canonical(actual[section].get(key)):
                out.append(f"{section} {key}")
    return out


def main() -> int:
    actual = current()
    if "--write" in sys.argv:
        GOLDEN.write_text(json.dumps(actual, indent=1, sort_keys=True) + "\n")
        print(
            f"wrote {GOLDEN.relative_to(ROOT)}: {len(actual['calibration'])} calibration plans, "
            f"{len(actual['grid'])} grid plans"
        )
        return 0
    changed = differences(json.loads(GOLDEN.read_text()), actual)
    print("\n".join(changed) or f"all {len(actual['calibration']) + len(actual['grid'])} plans unchanged")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
