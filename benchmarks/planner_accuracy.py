"""Predicted vs measured peak GPU memory for every calibration row.

    python benchmarks/planner_accuracy.py            # print the table
    python benchmarks/planner_accuracy.py --write    # also refresh the table in docs/planner-accuracy.md

Rows come from calibration/*.jsonl. Rows measured with HF Trainer + peft (refbench.py) are planned with the
HF_TRAINER recipe (peft's fp32 upcast for qlora, foreach AdamW, fp32 embedding states for 8-bit optimizers,
no expandable segments); rows whose case says `"recipe": "worker"` (benchmarks/vram_harness.py) with WORKER.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from domain.spec import JobSpec  # noqa: E402
from planner.catalog import find_model  # noqa: E402
from planner.core import HF_TRAINER, WORKER, Recipe, _phases, build_setup, estimate  # noqa: E402
from planner.shapes import ModelShape  # noqa: E402

DOC = ROOT / "docs" / "planner-accuracy.md"
BEGIN, END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"
GB = 1e9

_OPTIM = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
}
# refbench's Trainer(bf16=True) runs a bf16 (or fp32 for full32) model under bf16 autocast. In the worker's
# terms (worker/training/loading.py): adapters on a bf16 base under autocast = bf16-mixed; a bf16 model
# trained in bf16 = bf16 (autocast on bf16 weights allocates the same).
_METHOD = {
    "full32": ("full", "bf16-mixed"),
    "full16": ("full", "bf16"),
    "lora": ("lora", "bf16-mixed"),
    "qlora": ("qlora", "bf16-mixed"),
    "dora": ("lora", "bf16-mixed"),
    "freeze": ("freeze", "bf16"),
}


def _arch_table() -> dict:
    spec = importlib.util.spec_from_file_location("refbench", ROOT / "calibration" / "refbench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level imports only json/os/subprocess/sys/tempfile/time
    return module.ARCH


def refbench_spec(case: dict) -> JobSpec:
    """The job spec equivalent to one refbench.py case."""
    method, precision = _METHOD[case["method"]]
    body = {
        "base_model": case["arch"],
        "method": method,
        "training": {
            "micro_batch_size": case["bs"],
            "max_seq_length": case["seq"],
            "gradient_accumulation_steps": case.get("accum", 1),
        },
        "memory": {
            "precision": precision,
            "optimizer": _OPTIM[case["optim"]],
            "gradient_checkpointing": case["gc"],
            "fused_loss": bool(case.get("liger")),
        },
    }
    if method in ("lora", "qlora"):
        targets = case["targets"]
        body["lora"] = {
            "r": case["r"],
            "alpha": 2 * case["r"],
            "dropout": 0.05,
            "use_dora": case["method"] == "dora",
            "target_modules": targets if targets == "all-linear" else targets.split(","),
        }
    return JobSpec.model_validate(body)


def load_rows(paths: list[Path] | None = None) -> list[dict]:
    """Every measured row (errors skipped) of `paths`, by default calibration/*.jsonl."""
    rows = []
    for path in paths or sorted((ROOT / "calibration").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if line.strip() and "error" not in row and isinstance(row.get("nvml_used"), int):
                row["_file"] = path.name
                rows.append(row)
    return rows


def row_inputs(row: dict, arch: dict) -> tuple[JobSpec, ModelShape, Recipe]:
    """What one calibration row is planned from: its spec, its model's shape, and the recipe it was measured with."""
    case = row["case"]
    if "spec" in case:  # vram_harness.py rows carry the worker's own spec and model id
        spec, shape = JobSpec.model_validate(case["spec"]), find_model(case["model"])
        return spec, shape, replace(WORKER, expandable_segments=case.get("expandable", True))
    shape = ModelShape.from_config(dict(arch[case["arch"]]), name=case["arch"])
    recipe = replace(
        HF_TRAINER, kbit_upcast=not case.get("no_upcast"), expandable_segments=bool(case.get("expandable"))
    )
    return refbench_spec(case), shape, recipe


def predict(row: dict, arch: dict) -> tuple[int, int, str]:
    """(predicted nvml bytes, predicted peak allocated bytes, phase)."""
    spec, shape, recipe = row_inputs(row, arch)
    mb = spec.training.micro_batch_size
    phase, breakdown, _ = estimate(spec, shape, mb, recipe)
    phases, _ = _phases(shape, build_setup(spec, shape, mb, recipe), recipe)
    # torch's peak allocated is the largest phase before fragmentation and context
    alloc = max(
        sum(v for k, v in terms.items() if k not in ("allocator_fragmentation", "cuda_context"))
        for terms in phases.values()
    )
    return sum(breakdown.values()), alloc, phase


def table(rows: list[dict] | None = None) -> tuple[str, dict]:
    arch = _arch_table()
    lines = [
        "| case | method | bs×seq | gc | optim | measured GB | predicted GB | error "
        "| peak_alloc meas/pred GB | phase |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    errors = []
    for row in load_rows() if rows is None else rows:
        case = row["case"]
        pred, alloc, phase = predict(row, arch)
        err = (pred - row["nvml_used"]) / row["nvml_used"]
        errors.append((err, case["name"]))
        lines.append(
            f"| {case['name']} | {case['method']} | {case['bs']}×{case['seq']} | {'on' if case['gc'] else 'off'} "
            f"| {case['optim']} | {row['nvml_used'] / GB:.2f} | {pred / GB:.2f} | {err * 100:+.1f}% "
            f"| {_gb(row['peak_alloc'])} / {alloc / GB:.2f} | {phase} |"
        )
    abs_errors = [abs(e) for e, _ in errors]
    worst = max(errors, key=lambda e: abs(e[0]))
    under = min(errors)
    stats = {"n": len(errors), "median_abs": statistics.median(abs_errors), "worst": worst, "worst_under": under}
    lines += [
        "",
        f"{stats['n']} rows: median |error| {stats['median_abs'] * 100:.1f}%, "
        f"worst {worst[0] * 100:+.1f}% ({worst[1]}), "
        f"worst underestimate {min(0.0, under[0]) * 100:+.1f}% ({under[1]}).",
    ]
    return "\n".join(lines), stats


def _gb(value: int | None) -> str:
    return "–" if value is None else f"{value / GB:.2f}"


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def main() -> int:
    text, _ = table()
    print(text)
    if "--write" in sys.argv:
        write_doc(text)
        print(f"\nwrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
