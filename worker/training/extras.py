"""Pieces of the recipe around the training loop: the validation loss, and the lora/qlora artifacts (PiSSA
conversion, the merged model)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from domain.spec import JobSpec, Method
from worker.training import data
from worker.training.loss import loss_sum

EVALUATIONS_PER_RUN = 10  # eval loss at about 10 evenly spaced reports, and at the last step


def eval_due(step: int, total_steps: int) -> bool:
    return step == total_steps or step % max(1, total_steps // EVALUATIONS_PER_RUN) == 0


@torch.no_grad()
def eval_loss(
    model,
    examples: Sequence[data.TokenizedExample],
    *,
    micro_batch_size: int,
    collate: Callable[[Sequence[data.TokenizedExample]], dict],
    autocast,
    fused: bool,
) -> float | None:
    """Mean per-token loss over the held-out examples (dropout off), None when there are none."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for start in range(0, len(examples), micro_batch_size):
            batch_examples = examples[start : start + micro_batch_size]
            batch = collate(batch_examples)
            with autocast if autocast is not None else contextlib.nullcontext():
                total += loss_sum(model, batch, fused=fused).item()
            tokens += sum(example.learned_tokens for example in batch_examples)
    finally:
        model.train(was_training)
    return total / max(tokens, 1)


def save_adapter(spec: JobSpec, model, output_dir: Path, save_dir) -> list[str]:
    """adapter/: a PiSSA run is converted to an ordinary LoRA adapter (rank 2r) of the original base weights.

    Its base_model_name_or_path is the spec's base_model, the id the user gave: peft would write the directory
    the worker loaded from, a snapshot path in this machine's hub cache that means nothing anywhere else."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = spec.base_model
    initial = getattr(model, "ftjobs_pissa_initial", None)
    if initial is None:
        return save_dir(model, output_dir, "adapter")
    target = output_dir / "adapter"
    model.save_pretrained(target, path_initial_model_for_weight_conversion=str(initial))
    import shutil

    shutil.rmtree(initial, ignore_errors=True)
    return [path.relative_to(output_dir).as_posix() for path in sorted(target.rglob("*")) if path.is_file()]


def save_merged(spec: JobSpec, base_model_dir: Path, output_dir: Path, save_dir) -> list[str]:
    """model/: the ORIGINAL base reloaded in bf16 on the CPU with the saved adapter merged in. For qlora this merges
    into the full-precision weights (not the NF4/int8 ones the adapter trained against): the usual QLoRA export,
    which shifts the output by the base's quantization error."""
    if not spec.output.merge_adapter or spec.method not in (Method.lora, Method.qlora):
        return []
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_model_dir, dtype=torch.bfloat16, device_map={"": "cpu"}, use_safetensors=True
    )
    merged = PeftModel.from_pretrained(base, output_dir / "adapter").merge_and_unload()
    return save_dir(merged, output_dir, "model")


def save_tokenizer_beside_model(tokenizer, output_dir: Path, written: list[str]) -> list[str]:
    """model/ (merged, or a full fine-tune) gets the tokenizer and its chat template too, so the directory alone
    serves (`vllm serve model/`, AutoTokenizer.from_pretrained); returns the files it added."""
    target = output_dir / "model"
    if not any(name.startswith("model/") for name in written):
        return []
    tokenizer.save_pretrained(target)
    return sorted(
        {path.relative_to(output_dir).as_posix() for path in target.rglob("*") if path.is_file()} - set(written)
    )


def save_dir(saveable, output_dir: Path, name: str) -> list[str]:
    """save_pretrained into output_dir/name; the files written, relative to output_dir."""
    target = output_dir / name
    saveable.save_pretrained(target)  # transformers 5 and peft 0.21 write safetensors by default
    return [path.relative_to(output_dir).as_posix() for path in sorted(target.rglob("*")) if path.is_file()]
