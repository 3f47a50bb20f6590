"""`ftjobs demo`: a real QLoRA job end to end on a tiny model built on this machine (no downloads).

It builds a tiny Llama-architecture model with a real tokenizer, places the shipped instruction dataset under
the data root, starts the embedded stack (API + worker) unless --url is given, submits a QLoRA job, shows
progress until the job ends, then downloads the adapter and checks that it loads with peft and changes the
model's logits.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from ftjobs.client import Client, Job
from service.settings import get_settings

DEMO_DATASET = Path(__file__).parent / "demo_data" / "instructions.jsonl"
STARTUP_TIMEOUT_SECONDS = 120


def demo_spec(model_dir: Path) -> dict:
    return {
        "base_model": str(model_dir),
        "dataset": {"path": "demo/instructions.jsonl"},
        "dataset_format": "alpaca",
        "method": "qlora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True},
        "training": {
            "epochs": 1,
            "max_steps": 30,
            "micro_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_seq_length": 256,
            "learning_rate": 1e-2,
            "seed": 42,
        },
        "memory": {"precision": "bf16-mixed", "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True},
        "metadata": {"source": "ftjobs demo"},
    }


def prepare_inputs() -> Path:
    from ftjobs.tinymodel import build_tiny_model

    settings = get_settings()
    settings.ensure_dirs()
    # Under the first model root: the API reads base models nowhere else.
    model_dir = settings.model_root_dirs[0] / "ftjobs-demo-tiny-llama"
    if not (model_dir / "config.json").exists():
        print(f"building a tiny Llama model with a real tokenizer in {model_dir}")
        build_tiny_model(model_dir, arch="llama", seed=0)
    target = Path(settings.resolved_data_root) / "demo" / "instructions.jsonl"  # the embedded stack's local root
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEMO_DATASET, target)
    return model_dir


def run_demo(url: str | None, api_key: str | None = None) -> int:
    from ftjobs.cli import cli_api_key

    model_dir = prepare_inputs()
    stack = None
    if url is None:
        url, stack = _start_embedded_stack()
    try:
        # Read after the stack is up: on a first start `ftjobs up` has only just written the local key.
        client = Client(url, cli_api_key(api_key))
        job = client.submit(demo_spec(model_dir))
        print(
            f"submitted {job.id}: predicted peak GPU memory "
            f"{job.predicted_peak_bytes / 2**20:.0f} MiB (on a GPU; this machine trains on "
            f"{'the GPU' if _has_gpu() else 'the CPU'})"
        )
        job = client.watch(job.id)
        if job.status != "succeeded":
            print(f"job {job.status}: {job.error}")
            return 1
        _check_adapter(client, job, model_dir)
        return 0
    finally:
        if stack is not None:
            _stop(stack)


def _check_adapter(client: Client, job: Job, model_dir: Path) -> None:
    adapter_dir = get_settings().resolved_home / "demo" / job.id
    for artifact in job.artifacts:
        client.download(job.id, artifact.name, adapter_dir / artifact.name)
    change = adapter_logit_change(model_dir, adapter_dir / "adapter")
    print(f"artifacts in {adapter_dir}: {', '.join(a.name for a in job.artifacts)}")
    print(f"the adapter loads with peft and moves the tiny model's logits by up to {change:.4f}")
    if change == 0:
        raise SystemExit("the trained adapter left the logits unchanged")


def adapter_logit_change(model_dir: Path, adapter_dir: Path) -> float:
    """Largest absolute logit difference between the base model and base + adapter on a fixed prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("Name three primary colours.", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        before = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        after = tuned(**inputs).logits
    return float((after - before).abs().max())


def _has_gpu() -> bool:
    from worker.gpus import list_gpus

    return bool(list_gpus())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_embedded_stack() -> tuple[str, subprocess.Popen]:
    port = _free_port()
    env = {**os.environ, "FTJOBS_API_PORT": str(port), "FTJOBS_LOG_LEVEL": "WARNING"}
    stack = subprocess.Popen(
        [sys.executable, "-m", "ftjobs.cli", "up", "--port", str(port)], env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    client, deadline = Client(url), time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while not client.ready():
        if stack.poll() is not None or time.monotonic() > deadline:
            _stop(stack)
            raise SystemExit(f"the embedded stack did not become ready (exit code {stack.poll()})")
        time.sleep(0.5)
    print(f"embedded stack (API + worker) up at {url}")
    return url, stack


def _stop(stack: subprocess.Popen) -> None:
    stack.terminate()
    try:
        stack.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stack.kill()
