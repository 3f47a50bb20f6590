"""Three recipes on the same shapes, random weights at real sizes, in one run. A script, not a test: it needs a
CUDA GPU.
- stock: HF Trainer + peft prepare_model_for_kbit_training + NF4 + paged_adamw_8bit (calibration/refbench.py, as
  it ran for the calibration);
- lean: the best recipe anyone can assemble from the libraries: the same HF Trainer without the fp32 upcast, with
  expandable segments and Liger's kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy);
- ftjobs: the worker's recipe (worker.training.recipe.train) with memory.liger_kernels on.

    .venv/bin/python benchmarks/train_vs_stock.py --out train_vs_stock.jsonl        # on a GPU machine
    .venv/bin/python benchmarks/train_vs_stock.py --predict                         # planner only, no GPU

Each case and recipe runs in its own process (fresh CUDA context and peak counters). Printed: tokens/s and the
NVML per-process peak of the three, and ftjobs' ratios against both (goal: >= 2x stock's tokens/s and <= 0.4x
its peak, and no worse than lean on either). Tokens/s: every row excludes the first optimizer step (warm-up):
refbench times steps 2..N, and the worker row takes the progress reports of steps 1..N (logging every step; each
report follows a loss read, so the GPU has finished the step). Peaks: NVML per-process, sampled every 20 ms during
the worker run (vram_harness's sampler). All recipes read the same random-weight checkpoint (refbench's ckpt-ARCH
directory) so that one 7-14B model at a time sits on the disk. BENCH_DEADLINE_S starts no case after that many
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "calibration"))
sys.path.insert(0, str(ROOT / "benchmarks"))

# (name, refbench arch, catalog id, micro-batch, seq, gradient checkpointing, LoRA r, targets)
CASES = [
    ("q7b-bs2-seq2048-gc", "qwen2.5-7b", "Qwen/Qwen2.5-7B", 2, 2048, True, 16, "all-linear"),
    ("l31-8b-bs1-seq4096-gc", "llama-3.1-8b", "meta-llama/Llama-3.1-8B", 1, 4096, True, 16, "all-linear"),
    ("l2-7b-bs4-seq512-qv-r8", "llama-2-7b", "meta-llama/Llama-2-7b-hf", 4, 512, False, 8, "q_proj,v_proj"),
    ("q05-bs4-seq1024-gc", "qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", 4, 1024, True, 16, "all-linear"),
    ("q14b-bs1-seq1024-gc", "qwen2.5-14b", "Qwen/Qwen2.5-14B", 1, 1024, True, 16, "all-linear"),
]
RECIPES = ("stock", "lean", "ftjobs")
TMP = Path(os.environ.get("BENCH_TMP", tempfile.gettempdir()))


def worker_spec(case, base: str, optimizer: str, steps: int, liger: bool = True) -> dict:
    name, _, _, bs, seq, gc, r, targets = case
    return {
        "base_model": base,
        "method": "qlora",
        "dataset_format": "text",
        "lora": {
            "r": r,
            "alpha": 2 * r,
            "dropout": 0.05,
            "target_modules": "all-linear" if targets == "all-linear" else targets.split(","),
        },
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "training": {
            "max_steps": steps,
            "micro_batch_size": bs,
            "max_seq_length": seq,
            "learning_rate": 2e-4,
            "logging_steps": 1,
        },
        "memory": {
            "precision": "bf16-mixed",
            "optimizer": optimizer,
            "gradient_checkpointing": gc,
            "liger_kernels": liger,
        },
    }


def predict(optimizer: str) -> list[dict]:
    """Planner predictions (NOT measurements) of the three recipes' peaks."""
    import dataclasses

    from domain.spec import JobSpec
    from planner.catalog import find_model
    from planner.core import HF_TRAINER, WORKER, evaluate

    lean_recipe = dataclasses.replace(HF_TRAINER, kbit_upcast=False, expandable_segments=True)
    rows = []
    for case in CASES:
        shape = find_model(case[2])
        stock_spec = JobSpec.model_validate(worker_spec(case, case[2], "paged_adamw_8bit", 4, liger=False))
        lean_spec = JobSpec.model_validate(worker_spec(case, case[2], "paged_adamw_8bit", 4))
        ftjobs_spec = JobSpec.model_validate(worker_spec(case, case[2], optimizer, 4))
        stock = evaluate(stock_spec, shape, None, HF_TRAINER)
        lean = evaluate(lean_spec, shape, None, lean_recipe)
        ftjobs = evaluate(ftjobs_spec, shape, None, WORKER)
        rows.append(
            {
                "case": case[0],
                "predicted_stock_peak_bytes": stock.peak,
                "predicted_lean_peak_bytes": lean.peak,
                "predicted_ftjobs_peak_bytes": ftjobs.peak,
                "ftjobs_vs_stock": round(ftjobs.peak / stock.peak, 3),
                "ftjobs_vs_lean": round(ftjobs.peak / lean.peak, 3),
                "phases": {"stock": stock.phase, "lean": lean.phase, "ftjobs": ftjobs.phase},
            }
        )
    return rows


def run_worker(case, optimizer: str, steps: int) -> dict:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the worker sets it
    import refbench
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from vram_harness import NvmlSampler

    from domain.spec import JobSpec
    from ftjobs.tinymodel import build_tiny_tokenizer
    from worker.training import train

    name, arch, _, bs, seq, *_ = case
    ckpt = Path(refbench.TMP) / f"ckpt-{arch}"  # written by the stock run just before, else here
    if not (ckpt / "config.json").exists():
        params = dict(refbench.ARCH[arch])
        config = AutoConfig.for_model(params.pop("model_type"), **params)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        for old in Path(refbench.TMP).glob("ckpt-*"):
            shutil.rmtree(old)
        model.save_pretrained(ckpt)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if not (ckpt / "tokenizer.json").exists():
        build_tiny_tokenizer("qwen2" if arch.startswith("qwen") else "llama").save_pretrained(ckpt)
    # Text rows long enough that every sequence is cut at max_seq_length (no padding: the stock run has none).
    dataset = TMP / f"ftjobs-bench-{seq}.jsonl"
    words = ["alpha", "beta", "gamma", "delta", "omega", "lorem", "ipsum", "dolor", "sit", "amet"]
    with dataset.open("w") as f:
        for i in range(64):
            f.write(json.dumps({"text": " ".join(words[(i * 7 + j * 3) % 10] for j in range(2 * seq))}) + "\n")
    spec = JobSpec.model_validate(worker_spec(case, str(ckpt), optimizer, steps))
    reports: list[float] = []
    sampler = NvmlSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as out:
        result = train(
            spec,
            base_model_dir=ckpt,
            dataset_path=dataset,
            output_dir=Path(out),
            on_progress=lambda progress: reports.append(time.perf_counter()),
        )
    sampler.stop.set()
    sampler.join()
    nvml_used, nvml_source = sampler.peak()
    steady = (len(reports) - 1) * bs * seq / (reports[-1] - reports[0])  # steps 2..N, every row full length
    return {
        "recipe": "ftjobs",
        "case": name,
        "optimizer": optimizer,
        "steps": result.steps,
        "tokens_per_s": round(steady, 1),
        "tokens_per_s_incl_first_step": round(result.tokens_per_second, 1),
        "peak_reserved": result.peak_memory_bytes,
        "nvml_used": nvml_used,
        "nvml_source": nvml_source,
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }


def run_refbench(case, recipe: str) -> dict:
    """stock, or lean: the same HF Trainer without the kbit upcast, with expandable segments and Liger."""
    import refbench

    name, arch, _, bs, seq, gc, r, targets = case
    lean = {"liger": True, "no_upcast": True, "expandable": True} if recipe == "lean" else {}
    c = refbench.case(name, arch, "qlora", bs, seq, gc, "paged_adamw_8bit", r=r, targets=targets, steps=4, **lean)
    result = refbench.run_case(c)
    return {
        "recipe": recipe,
        "case": name,
        "tokens_per_s": result["tokens_per_s"],
        "peak_reserved": result["peak_reserved"],
        "nvml_used": result["nvml_used"],
        "gpu": result["gpu"],
        "versions": result["versions"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="train_vs_stock.jsonl")
    parser.add_argument("--predict", action="store_true", help="print the planner's predictions only (no GPU)")
    parser.add_argument("--worker-optimizer", default="paged_adamw_8bit")
    parser.add_argument("--worker-steps", type=int, default=6)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_steps < 2:
        parser.error("--worker-steps must be at least 2: the first step is warm-up, not counted in tokens/s")
    if args.predict:
        for row in predict(args.worker_optimizer):
            print(json.dumps(row))
        return
    if args.one:  # child process: one recipe on one case
        recipe, index = args.one.split(":")
        case = CASES[int(index)]
        try:
            if recipe == "ftjobs":
                row = run_worker(case, args.worker_optimizer, args.worker_steps)
            else:
                row = run_refbench(case, recipe)
        except Exception as exc:  # noqa: BLE001 - one failed case must not hide the others
            row = {"recipe": recipe, "case": case[0], "error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(row), flush=True)
        return

    predictions = {row["case"]: row for row in predict(args.worker_optimizer)}
    deadline = time.time() + float(os.environ.get("BENCH_DEADLINE_S", "inf"))
    print(f"{'case':22} {'tokens/s: stock':>15} {'lean':>7} {'ftjobs':>7} {'x stock':>7} {'x lean':>6} "
          f"{'peak GiB: stock':>15} {'lean':>6} {'ftjobs':>6} {'x stock':>7} {'x lean':>6}")  # fmt: skip
    for index, case in enumerate(CASES):
        if time.time() > deadline:
            print(f"{case[0]:22} not run: BENCH_DEADLINE_S reached")
            continue
        rows = {recipe: run_one(args, recipe, index, case, predictions) for recipe in RECIPES}
        failed = [row for row in rows.values() if "error" in row]
        if failed:
            print(f"{case[0]:22} error: {failed[0]['recipe']}: {failed[0]['error']}")
            continue
        speed = {recipe: rows[recipe]["tokens_per_s"] for recipe in RECIPES}
        peak = {recipe: (rows[recipe]["nvml_used"] or 0) / 2**30 for recipe in RECIPES}
        print(
            f"{case[0]:22} {speed['stock']:>15.0f} {speed['lean']:>7.0f} {speed['ftjobs']:>7.0f} "
            f"{speed['ftjobs'] / speed['stock']:>7.2f} {speed['ftjobs'] / speed['lean']:>6.2f} "
            f"{peak['stock']:>15.2f} {peak['lean']:>6.2f} {peak['ftjobs']:>6.2f} "
            f"{peak['ftjobs'] / peak['stock']:>7.2f} {peak['ftjobs'] / peak['lean']:>6.2f}"
        )
    print("goal: ftjobs >= 2.00x stock's tokens/s and >= lean's; peak <= 0.40x stock's and <= lean's (NVML)")


def run_one(args, recipe: str, index: int, case, predictions: dict) -> dict:
    """One recipe on one case in a fresh process; its row is appended to --out as it comes."""
    start = time.time()
    command = [sys.executable, __file__, "--one", f"{recipe}:{index}", "--worker-optimizer",
               args.worker_optimizer, "--worker-steps", str(args.worker_steps)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if found:
        row = json.loads(found[-1][7:])
    else:
        row = {"recipe": recipe, "case": case[0], "error": "no result", "stderr": proc.stderr[-2000:]}
    row["wall_s"] = round(time.time() - start, 1)
    row["predicted_peak_bytes"] = predictions[case[0]][f"predicted_{recipe}_peak_bytes"]
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
