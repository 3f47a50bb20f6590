"""The worker's recipe (worker.training.recipe.train) against the stock one (HF Trainer + peft
prepare_model_for_kbit_training + NF4 + paged_adamw_8bit: calibration/refbench.py, run as it ran for the
calibration) on the same shapes, random weights at real sizes. A script, not a test: it needs a CUDA GPU.

    .venv/bin/python benchmarks/train_vs_stock.py --out train_vs_stock.jsonl        # on a GPU machine
    .venv/bin/python benchmarks/train_vs_stock.py --predict                         # planner only, no GPU

Each case and recipe runs in its own process (fresh CUDA context and peak counters). Printed: tokens/s and the
NVML per-process peak of both, and the ratios against the goal (worker >= 2x tokens/s, <= 0.4x peak VRAM).
Tokens/s: both rows exclude the first optimizer step (warm-up): refbench times steps 2..N, and the worker row
takes the progress reports of steps 1..N (logging every step; each report follows a loss read, so the GPU has
finished the step). Peaks: NVML per-process, sampled every 20 ms during the worker run (vram_harness's sampler).
Both recipes read the same random-weight checkpoint (refbench's ckpt-ARCH directory) so that one 7-8B model at
a time sits on the disk. BENCH_DEADLINE_S starts no case after that many seconds.
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
]
TMP = Path(os.environ.get("BENCH_TMP", tempfile.gettempdir()))


def worker_spec(case, base: str, optimizer: str, steps: int) -> dict:
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
        "memory": {"precision": "bf16-mixed", "optimizer": optimizer, "gradient_checkpointing": gc},
    }


def predict(optimizer: str) -> list[dict]:
    """Planner predictions (NOT measurements) of both recipes' peaks."""
    from domain.spec import JobSpec
    from planner.catalog import find_model
    from planner.core import HF_TRAINER, WORKER, evaluate

    rows = []
    for case in CASES:
        spec = JobSpec.model_validate(worker_spec(case, case[2], optimizer, 4))
        stock_spec = JobSpec.model_validate(worker_spec(case, case[2], "paged_adamw_8bit", 4))
        shape = find_model(case[2])
        worker, stock = evaluate(spec, shape, None, WORKER), evaluate(stock_spec, shape, None, HF_TRAINER)
        rows.append(
            {
                "case": case[0],
                "predicted_worker_peak_bytes": worker.peak,
                "predicted_stock_peak_bytes": stock.peak,
                "ratio": round(worker.peak / stock.peak, 3),
                "worker_phase": worker.phase,
                "stock_phase": stock.phase,
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
        "recipe": "worker",
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


def run_stock(case) -> dict:
    import refbench

    name, arch, _, bs, seq, gc, r, targets = case
    c = refbench.case(name, arch, "qlora", bs, seq, gc, "paged_adamw_8bit", r=r, targets=targets, steps=4)
    result = refbench.run_case(c)
    return {
        "recipe": "stock",
        "case": name,
        "tokens_per_s": result["tokens_per_s"],
        "peak_reserved": result["peak_reserved"],
        "nvml_used": result["nvml_used"],
        "gpu": result["gpu"],
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
            row = run_worker(case, args.worker_optimizer, args.worker_steps) if recipe == "worker" else run_stock(case)
        except Exception as exc:  # noqa: BLE001 - one failed case must not hide the others
            row = {"recipe": recipe, "case": case[0], "error": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(row), flush=True)
        return

    predictions = {row["case"]: row for row in predict(args.worker_optimizer)}
    deadline = time.time() + float(os.environ.get("BENCH_DEADLINE_S", "inf"))
    print(
        f"{'case':26} {'stock tok/s':>11} {'worker tok/s':>12} {'x':>5} {'stock peak GiB':>14} "
        f"{'worker peak GiB':>15} {'x':>5}"
    )
    for index, case in enumerate(CASES):
        if time.time() > deadline:
            print(f"{case[0]:26} not run: BENCH_DEADLINE_S reached")
            continue
        rows = {}
        for recipe in ("stock", "worker"):
            start = time.time()
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    f"{recipe}:{index}",
                    "--worker-optimizer",
                    args.worker_optimizer,
                    "--worker-steps",
                    str(args.worker_steps),
                ],
                capture_output=True,
                text=True,
                timeout=1800,
            )
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = (
                json.loads(found[-1][7:])
                if found
                else {"recipe": recipe, "case": case[0], "error": "no result", "stderr": proc.stderr[-2000:]}
            )
            row["wall_s"] = round(time.time() - start, 1)
            row["predicted_peak_bytes"] = predictions[case[0]][f"predicted_{recipe}_peak_bytes"]
            rows[recipe] = row
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        s, w = rows["stock"], rows["worker"]
        if "error" in s or "error" in w:
            print(f"{case[0]:26} error: {s.get('error') or w.get('error')}")
            continue
        speed = w["tokens_per_s"] / s["tokens_per_s"]
        peak = (w["nvml_used"] or 0) / max(s["nvml_used"] or 1, 1)
        print(
            f"{case[0]:26} {s['tokens_per_s']:>11.0f} {w['tokens_per_s']:>12.0f} {speed:>5.2f} "
            f"{(s['nvml_used'] or 0) / 2**30:>14.2f} {(w['nvml_used'] or 0) / 2**30:>15.2f} {peak:>5.2f}"
        )
    print("goal: worker >= 2.00x tokens/s and <= 0.40x peak VRAM (NVML per-process)")


if __name__ == "__main__":
    main()
