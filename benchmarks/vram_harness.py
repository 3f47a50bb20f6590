"""Measure the worker's real peak GPU memory on a lent GPU, case by case, into a JSONL the planner is fitted on.

    python benchmarks/vram_harness.py --list
    python benchmarks/vram_harness.py all calibration/h100-worker.jsonl          # every case, then the table
    python benchmarks/vram_harness.py small out.jsonl                              # 0.5-3B models (or: big)
    python benchmarks/vram_harness.py w-q05-qlora-gc,w-q05-lora-gc out.jsonl      # some cases
Environment: FTJOBS_VRAM_DEADLINE_S starts no case after that many seconds (to fit a lease); a model's
random-weight checkpoint is deleted after its cases unless FTJOBS_VRAM_KEEP=1 (a 64 GiB disk holds few 7-14B).

Then `python benchmarks/planner_accuracy.py --write` compares the planner with every calibration/*.jsonl row.

How (the same method as calibration/refbench.py, but running ftjobs' own worker):
- For each model, a "prepare" subprocess writes a random-weight bf16 checkpoint with the model's exact
  config.json shapes (planner catalog), a word-level tokenizer with the model's vocabulary size, and a text
  dataset whose every row is longer than max_seq_length (so each micro-batch is the worst case).
- Each case then runs in a fresh process (fresh CUDA context and peak counters) with the worker's
  PYTORCH_CUDA_ALLOC_CONF, calls worker.training.recipe.train(...) for `steps` optimizer steps, and records
  torch's peak allocated/reserved, the NVML per-process used memory (sampled every 20 ms, max kept),
  the library versions and the GPU. Peak memory does not depend on the weight values.
Needs a CUDA GPU; nothing here runs in the test suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("FTJOBS_VRAM_DIR", Path(tempfile.gettempdir()) / "ftjobs-vram"))
ALLOC_CONF = "expandable_segments:True"  # what the worker's job process sets

_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


def case(
    name,
    model,
    method,
    mb,
    seq,
    gc=True,
    optimizer=None,
    precision="bf16-mixed",
    fused=False,
    steps=4,
    expandable=True,
    liger=None,
    padding_free=False,
    offload_activations=False,
    **options,
):
    """One measurement: a model from the planner catalog and a job spec body for the worker."""
    optimizer = optimizer or ("paged_adamw_8bit" if method == "qlora" else "adamw")
    spec = {
        "base_model": model,
        "method": method,
        "dataset_format": "text",
        "training": {
            "micro_batch_size": mb,
            "max_seq_length": seq,
            "max_steps": steps,
            "gradient_accumulation_steps": 1,
            "logging_steps": 1,
            "padding_free": padding_free,
        },
        "memory": {
            "precision": precision,
            "optimizer": optimizer,
            "gradient_checkpointing": gc,
            "fused_loss": fused,
            "liger_kernels": liger,
            "offload_activations": offload_activations,
        },
    }
    spec |= options  # lora / quantization / freeze option blocks
    return {
        "name": name,
        "model": model,
        "spec": spec,
        "expandable": expandable,
        "recipe": "worker",
        # the fields planner_accuracy.py prints
        "method": method if method != "full" else f"full/{precision}",
        "bs": mb,
        "seq": seq,
        "gc": gc,
        "optim": optimizer,
        "steps": steps,
    }


Q05, Q15, L1B, L3B = "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B"
Q7B, L8B, M7B, G2B, Q14B = (
    "Qwen/Qwen2.5-7B",
    "meta-llama/Llama-3.1-8B",
    "mistralai/Mistral-7B-v0.3",
    "google/gemma-2-2b",
    "Qwen/Qwen2.5-14B",
)
DORA = {"lora": {"use_dora": True}}
QV = {"lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}}
CASES = [
    # small models: one knob at a time against the calibration's q05 rows
    case("w-q05-qlora-gc", Q05, "qlora", 4, 1024),  # lean path (no fp32 upcast) vs q05-qlora-gc
    case("w-q05-lora-gc", Q05, "lora", 4, 1024),
    case("w-q05-lora-gc-noexp", Q05, "lora", 4, 1024, expandable=False),  # expandable segments' effect
    case("w-q05-lora-nogc", Q05, "lora", 4, 1024, gc=False),
    case("w-q05-lora-fused", Q05, "lora", 4, 1024, fused=True),
    case("w-q05-lora-adamw8", Q05, "lora", 4, 1024, optimizer="adamw_8bit"),
    case("w-q05-dora-gc", Q05, "lora", 4, 1024, **DORA),
    case("w-q05-full-mixed", Q05, "full", 4, 1024),
    case("w-q05-full-bf16", Q05, "full", 4, 1024, precision="bf16"),
    case("w-q05-full-bf16-adamw8", Q05, "full", 4, 1024, precision="bf16", optimizer="adamw_8bit"),
    case("w-q05-full-paged32", Q05, "full", 4, 1024, optimizer="paged_adamw_32bit"),
    case("w-q05-full-adamw4", Q05, "full", 4, 1024, optimizer="adamw_4bit"),
    case("w-q05-full-cpuoffload", Q05, "full", 4, 1024, optimizer="cpu_offload"),
    case("w-q05-lora-adamw4", Q05, "lora", 4, 1024, optimizer="adamw_4bit"),
    case("w-q05-full-galore", Q05, "full", 4, 1024, optimizer="galore_adamw"),
    case("w-q05-full-bf16-galore8", Q05, "full", 4, 1024, precision="bf16", optimizer="galore_adamw_8bit"),
    case("w-q05-full-badam", Q05, "full", 4, 1024, optimizer="badam"),  # NOT MEASURED yet: no GPU since BAdam
    # FSDP2's single-rank path (a group of one): NOT MEASURED yet, no GPU since the worker trains sharded
    case("w-q05-full-fsdp1-zero3", Q05, "full", 4, 1024, resources={"num_gpus": 1, "sharding": "zero3"}),
    case("w-q05-lora-fsdp1-zero3", Q05, "lora", 4, 1024, resources={"num_gpus": 1, "sharding": "zero3"}),
    case("w-q05-full-fsdp1-zero2", Q05, "full", 4, 1024, resources={"num_gpus": 1, "sharding": "zero2"}),
    # Liger's kernels and padding-free batches (issue 15): NOT MEASURED yet, no GPU since they were wired
    case("w-q05-lora-gc-liger", Q05, "lora", 4, 1024, liger=True),
    case("w-q05-qlora-gc-liger", Q05, "qlora", 4, 1024, liger=True),
    case("w-q05-lora-gc-pf", Q05, "lora", 4, 1024, padding_free=True),
    case("w-q05-lora-nogc-liger-pf", Q05, "lora", 4, 1024, gc=False, liger=True, padding_free=True),
    case("w-q05-lora-gc-offload", Q05, "lora", 4, 1024, offload_activations=True),
    case("w-q05-lora-nogc-offload", Q05, "lora", 4, 1024, gc=False, offload_activations=True),
    case("w-q05-full-fp16mixed", Q05, "full", 4, 1024, precision="fp16-mixed"),
    case("w-q05-full-fp32-512", Q05, "full", 4, 512, precision="fp32"),
    case("w-q05-freeze2", Q05, "freeze", 4, 1024, freeze={"trainable_layers": 2}),
    # 1-3B: sequence length and checkpointing
    case("w-q15-qlora-gc-2k", Q15, "qlora", 2, 2048),
    case("w-l1b-qlora-nogc-4k", L1B, "qlora", 1, 4096, gc=False),
    case("w-l1b-qlora-gc-512-mb8", L1B, "qlora", 8, 512),
    case("w-l1b-lora-gc-4k-fused", L1B, "lora", 2, 4096, fused=True),
    case("w-l1b-full-mixed-gc-2k", L1B, "full", 2, 2048),
    case("w-l3b-lora-gc-8k", L3B, "lora", 1, 8192),
    case("w-g2b-lora-gc-2k", G2B, "lora", 2, 2048),
    case("w-g2b-freeze4-1k", G2B, "freeze", 2, 1024, freeze={"trainable_layers": 4}),
    # 7-14B: the service's main use
    case("w-q7b-qlora-gc-2k", Q7B, "qlora", 2, 2048),
    case("w-q7b-full-badam-gc-1k", Q7B, "full", 2, 1024, optimizer="badam"),  # NOT MEASURED yet
    case("w-q7b-qlora-gc-2k-liger", Q7B, "qlora", 2, 2048, liger=True),  # NOT MEASURED yet
    case("w-l8b-qlora-gc-4k-liger", L8B, "qlora", 1, 4096, liger=True),  # NOT MEASURED yet
    case("w-q7b-qlora-gc-2k-fused", Q7B, "qlora", 2, 2048, fused=True),
    case("w-q7b-qlora-gc-8k-fused", Q7B, "qlora", 1, 8192, fused=True),
    case("w-l8b-qlora-gc-4k", L8B, "qlora", 1, 4096),
    case("w-l8b-lora-gc-2k", L8B, "lora", 2, 2048),
    case("w-l8b-dora-qlora-gc-2k", L8B, "qlora", 1, 2048, **DORA),
    case("w-m7b-qlora-nogc-qv-512", M7B, "qlora", 4, 512, gc=False, **QV),
    case("w-m7b-qlora-nogc-qv-512-offload", M7B, "qlora", 4, 512, gc=False, offload_activations=True, **QV),
    case("w-q14b-qlora-gc-2k", Q14B, "qlora", 1, 2048),
    case("w-q14b-qlora-gc-2k-paged32", Q14B, "qlora", 1, 2048, optimizer="paged_adamw_32bit"),
]


# ---- preparation: random weights, tokenizer, data -----------------------------------------------------------
def model_dir(model: str) -> Path:
    return WORK / "models" / model.replace("/", "--")


def prepare_model(model: str) -> Path:
    """Random bf16 weights at the catalog shape + the project's tiny byte-level BPE tokenizer (its ids are all
    below every catalog vocabulary, so the embedding and lm_head keep the model's real vocabulary size)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftjobs.tinymodel import build_tiny_tokenizer
    from planner.catalog import _DATA

    out = model_dir(model)
    if (out / "config.json").exists():
        return out
    entry = json.loads(_DATA.read_text())["models"][model]
    cfg_values = dict(entry["config"])
    model_type = cfg_values.pop("model_type")
    for context_key in ("max_position_embeddings", "rope_scaling"):  # the harness builds every shape at 131072
        cfg_values.pop(context_key, None)
    cfg = AutoConfig.for_model(
        model_type,
        **cfg_values,
        max_position_embeddings=131072,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        architectures=[_ARCH[model_type]],
    )
    with torch.device("cuda"):
        net = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(out, safe_serialization=True)
    tokenizer = build_tiny_tokenizer("qwen2" if model_type == "qwen2" else "llama")
    tokenizer.model_max_length = 1 << 20
    tokenizer.save_pretrained(out)
    return out


def prepare_dataset(c: dict) -> Path:
    """Text rows longer than max_seq_length: every sequence is cut at the limit (the planner's worst case)."""
    import random

    from ftjobs.tinymodel import demo_texts

    spec = c["spec"]
    seq, mb = spec["training"]["max_seq_length"], spec["training"]["micro_batch_size"]
    path = WORK / "data" / f"text-{seq}.jsonl"
    rows = max(64, 2 * mb * spec["training"]["max_steps"])
    if path.exists() and sum(1 for _ in path.open()) >= rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    words = sorted({word for text in demo_texts() for word in text.split()})
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(rows):  # every word is at least one token
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(seq + 64))}) + "\n")
    return path


def check_rows_reach_the_limit(base: Path, data: Path, seq: int) -> int:
    """Guard against a silently short measurement: the first row must tokenize to at least max_seq_length."""
    from worker.training.data import _tokenize_text, load_tokenizer

    tokens = len(_tokenize_text(load_tokenizer(base), json.loads(data.open().readline())["text"])[0])
    if tokens < seq:
        raise RuntimeError(f"a dataset row is {tokens} tokens, under max_seq_length={seq}")
    return tokens


# ---- measurement ---------------------------------------------------------------------------------------------
class NvmlSampler(threading.Thread):
    """Max NVML used memory of this process, sampled every 20 ms (what nvidia-smi shows for it). Also the
    device's used memory above what it was before this process touched CUDA, in case a virtualised driver
    hides per-process figures; the row says which one it holds."""

    def __init__(self):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.device_baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used
        self.max_used = self.max_device_delta = 0
        self.stop = threading.Event()

    def read(self) -> int:
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return proc.usedGpuMemory
        return 0

    def sample(self) -> None:
        self.max_used = max(self.max_used, self.read())
        delta = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.device_baseline
        self.max_device_delta = max(self.max_device_delta, delta)

    def run(self):
        while not self.stop.wait(0.02):
            self.sample()

    def peak(self) -> tuple[int, str]:
        self.sample()
        return (self.max_used, "nvml_process") if self.max_used else (self.max_device_delta, "nvml_device_delta")


def run_case(c: dict) -> dict:
    import torch

    from domain.spec import JobSpec
    from planner import plan
    from planner.catalog import find_model
    from worker.training.recipe import train  # imported lazily: the worker stack needs torch and a GPU

    spec = JobSpec.model_validate(c["spec"])
    base, data = model_dir(c["model"]), prepare_dataset(c)
    row_tokens = check_rows_reach_the_limit(base, data, spec.training.max_seq_length)
    sampler = NvmlSampler()
    sampler.start()
    steps, t0 = [], time.time()
    ranks = None
    if spec.resources.effective_sharding is not None:  # FSDP2 on this one GPU: a process group of one
        from worker.training.ranks import join_process_group

        ranks = join_process_group()
    with tempfile.TemporaryDirectory() as out_dir:
        result = train(
            spec,
            base_model_dir=base,
            dataset_path=data,
            output_dir=Path(out_dir),
            on_progress=lambda progress: steps.append(time.time()),
            should_stop=lambda: False,
            ranks=ranks,
        )
    torch.cuda.synchronize()
    sampler.stop.set()
    sampler.join()
    peak_reserved = torch.cuda.max_memory_reserved()
    predicted = plan(spec, find_model(c["model"]), None, suggest=False)
    nvml_used, nvml_source = sampler.peak()
    import bitsandbytes
    import peft
    import transformers

    return {
        "case": c,
        "peak_alloc": torch.cuda.max_memory_allocated(),
        "peak_reserved": peak_reserved,
        "nvml_used": nvml_used,
        "nvml_source": nvml_source,
        "nvml_minus_reserved": nvml_used - peak_reserved,
        "predicted_nvml": predicted.peak_vram_bytes,
        "predicted_breakdown": predicted.breakdown,
        "progress_calls": len(steps),
        "first_row_tokens": row_tokens,
        "worker_peak_memory_bytes": getattr(result, "peak_memory_bytes", None),
        "wall_train_s": round(time.time() - t0, 1),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bnb": bitsandbytes.__version__,
            "torchao": _version("torchao"),
            "cuda": torch.version.cuda,
        },
        "gpu": torch.cuda.get_device_name(0),
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _child(mode: str, payload: str) -> None:
    if mode == "--prepare":
        print("PREPARED", prepare_model(payload), flush=True)
        return
    c = json.loads(payload)
    try:
        result = run_case(c)
    except Exception as exc:  # report, don't die silently
        import traceback

        result = {"case": c, "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()[-2000:]}
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] in ("--prepare", "--one"):
        _child(sys.argv[1], sys.argv[2])
        return 0
    if sys.argv[1:] == ["--list"]:
        for c in CASES:
            print(c["name"], c["model"], json.dumps(c["spec"]))
        return 0
    selected, out = sys.argv[1], Path(sys.argv[2])
    cases = [c for c in CASES if selected in ("all", _size_group(c["model"])) or c["name"] in selected.split(",")]
    timeout = int(os.environ.get("CASE_TIMEOUT", "900"))
    deadline = time.time() + float(os.environ.get("FTJOBS_VRAM_DEADLINE_S", "inf"))
    for model in dict.fromkeys(c["model"] for c in cases):
        if time.time() > deadline:
            print("deadline reached: not run:", [c["name"] for c in cases if c["model"] == model], flush=True)
            continue
        # a fresh process writes the weights, so that its CUDA memory is gone before the first case
        subprocess.run([sys.executable, __file__, "--prepare", model], check=True, timeout=timeout)
        for c in (c for c in cases if c["model"] == model):
            if time.time() > deadline:
                print("deadline reached: not run:", c["name"], flush=True)
                continue
            _run_one(c, out, timeout)
        if os.environ.get("FTJOBS_VRAM_KEEP") != "1":
            shutil.rmtree(model_dir(model))
    if out.exists():  # predicted vs measured for every row of the output file, as docs/planner-accuracy.md shows
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import planner_accuracy

        print(planner_accuracy.table(planner_accuracy.load_rows([out]))[0])
    return 0


def _size_group(model: str) -> str:
    return "big" if model in (Q7B, L8B, M7B, Q14B) else "small"


def _run_one(c: dict, out: Path, timeout: int) -> None:
    started = time.time()
    env = dict(os.environ)
    if c["expandable"]:
        env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    proc = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(c)], capture_output=True, text=True, timeout=timeout, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    row = json.loads(lines[-1][7:]) if lines else {"case": c, "error": "no result", "stderr": proc.stderr[-2000:]}
    row["wall_s"] = round(time.time() - started, 1)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    short = {k: row.get(k) for k in ("peak_alloc", "peak_reserved", "nvml_used", "predicted_nvml", "error")}
    print(c["name"], json.dumps(short), flush=True)


if __name__ == "__main__":
    sys.exit(main())
