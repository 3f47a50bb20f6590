"""The training recipe, top to bottom: validate data -> setup model -> setup optimizer -> train -> save.

`train` is what the job process calls. It raises:
  InvalidDataset       a malformed row (checked before any model is loaded) or nothing left to learn
  JobCancelled         should_stop() answered True (checked before every micro-step)
  JobDrained           should_drain() answered True (checked before every optimizer step); a checkpoint of the
                       last completed step is saved first, so the job resumes there
  TrainingOutOfMemory  the accelerator ran out of memory (chained to torch's error)
  ValueError           a spec the planner should have resolved ("auto" batch size) or that cannot apply
                       to this model (more freeze layers than it has)
The precision mapping, optimizers and LR schedule are documented in worker/training/loading.py; checkpoints,
and how a run resumes from the last one in output_dir/checkpoints, in worker/training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from domain.datasets import iter_examples
from domain.errors import JobCancelled, JobDrained, TrainingOutOfMemory
from domain.messages import Progress
from domain.spec import JobSpec, Method
from worker.training import checkpoint, data, extras, loading
from worker.training.loss import loss_sum
from worker.training.memory import MemoryProbe


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float  # per-token loss of the last optimizer step
    tokens_per_second: float
    wall_seconds: float  # the whole call: validation, loading, training and saving
    peak_memory_bytes: int | None  # torch.cuda.max_memory_reserved on the GPU, None on the CPU
    artifacts: list[str]  # paths relative to output_dir, '/'-separated, sorted


def train(
    spec: JobSpec,
    *,
    base_model_dir: Path,
    dataset_path: Path,
    output_dir: Path,
    validation_path: Path | None = None,  # spec.validation_dataset's rows, staged
    on_progress: Callable[[Progress], None] = lambda progress: None,
    should_stop: Callable[[], bool] = lambda: False,
    should_drain: Callable[[], bool] = lambda: False,
    on_checkpoint: Callable[[int, str], None] = lambda step, path: None,  # path relative to output_dir
    on_resume: Callable[[int], None] = lambda step: None,
) -> TrainResult:
    wall_start = time.perf_counter()
    micro_batch_size = spec.training.micro_batch_size
    if not isinstance(micro_batch_size, int):
        raise ValueError("micro_batch_size 'auto' must be resolved to a number before training")
    # Read and validate the whole dataset first: a malformed row fails in seconds, not after a model load.
    examples = list(iter_examples(dataset_path, spec.dataset_format))
    held_out = list(iter_examples(validation_path, spec.dataset_format)) if validation_path else None

    # --- setup ------------------------------------------------------------------------------------------
    from transformers import set_seed

    set_seed(spec.training.seed)  # python, numpy and torch RNGs: LoRA init, dropout
    device = loading.pick_device()
    loading.check_device_support(spec, device)  # a CUDA-only optimizer on a CPU worker: refused before loading
    plan = loading.precision_plan(spec.memory.precision)
    memory = MemoryProbe(device)
    tokenizer = data.load_tokenizer(base_model_dir)
    dataset, dropped_examples = data.tokenize_examples(tokenizer, examples, spec.training.max_seq_length)
    if held_out is None:
        dataset, validation = data.split_validation(dataset, spec.training.validation_fraction, spec.training.seed)
    else:
        validation, _ = data.tokenize_examples(tokenizer, held_out, spec.training.max_seq_length)
    source_examples = len(dataset)
    if spec.training.packing:
        dataset = data.pack_examples(dataset, spec.training.max_seq_length, spec.training.seed)
    fused_loss = spec.memory.fused_loss is not False  # None: the worker's chunked loss runs on every device
    accumulation = spec.training.gradient_accumulation_steps
    micro_per_epoch = data.micro_batches_per_epoch(len(dataset), micro_batch_size)
    total_steps = spec.training.max_steps or max(1, math.ceil(spec.training.epochs * micro_per_epoch / accumulation))
    stream = data.micro_batches(dataset, micro_batch_size, spec.training.seed)

    step = 0
    try:
        model = loading.load_model(spec, Path(base_model_dir), device, plan)
        parameters = loading.trainable_parameters(model)
        optimizer = loading.build_optimizer(spec, loading.parameter_groups(spec, model), device)
        scheduler = loading.build_schedule(optimizer, total_steps)
        scaler = torch.amp.GradScaler(device.type) if plan.grad_scaler else None
        autocast = (
            torch.autocast(device.type, dtype=plan.autocast_dtype) if plan.autocast_dtype else contextlib.nullcontext()
        )
        eval_losses: list[dict] = []

        def _eval(at_step: int) -> float | None:  # held-out loss at ~10 evenly spaced reports and the last one
            if not validation or not extras.eval_due(at_step, total_steps):
                return None
            value = extras.eval_loss(
                model,
                validation,
                micro_batch_size=micro_batch_size,
                device=device,
                pad_token_id=tokenizer.pad_token_id,
                autocast=autocast,
                fused=fused_loss,
            )
            eval_losses.append({"step": at_step, "eval_loss": value})
            return value

        # --- train --------------------------------------------------------------------------------------
        # A retried job (same output dir) carries on from its last complete checkpoint; a first run from 0.
        checkpoints = checkpoint.Checkpoints(Path(output_dir) / "checkpoints", spec, micro_per_epoch)
        resumed = checkpoints.resume(model, optimizer, scheduler, scaler, stream)
        if resumed.step:
            on_resume(resumed.step)
        train_start = time.perf_counter() - resumed.train_seconds
        tokens_seen = resumed.tokens_seen
        micro_steps = resumed.micro_steps
        loss_curve: list[dict] = resumed.loss_curve
        losses_since_report: list[float] = resumed.losses_since_report
        last_saved_step = resumed.step
        for step in range(resumed.step + 1, total_steps + 1):
            if should_drain():
                if step - 1 > last_saved_step:
                    state = checkpoint.RunState(
                        step - 1,
                        micro_steps,
                        tokens_seen,
                        time.perf_counter() - train_start,
                        loss_curve,
                        losses_since_report,
                    )
                    on_checkpoint(step - 1, checkpoints.save(state, model, optimizer, scheduler, scaler))
                raise JobDrained(f"drained after step {step - 1}")
            window = [next(stream) for _ in range(accumulation)]
            # Normalise by the learned tokens of the whole step, so accumulation equals one big batch.
            learned_tokens = sum(example.learned_tokens for micro in window for example in micro)
            step_loss = torch.zeros((), device=device)
            for micro in window:
                if should_stop():
                    raise JobCancelled(f"cancelled at step {step - 1}")
                batch = data.collate_any(micro, tokenizer.pad_token_id, device)
                with autocast:
                    loss = loss_sum(model, batch, fused=fused_loss) / learned_tokens
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.detach()
                tokens_seen += sum(len(example.input_ids) for example in micro)  # host-side: no GPU sync
                micro_steps += 1

            if scaler:
                scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            loading.clip_gradients(optimizer, parameters, loading.MAX_GRAD_NORM)
            if scaler:
                scaler.step(optimizer)  # skips the step if the scaled gradients overflowed
                scaler.update()
            else:
                optimizer.step()
            learning_rate = float(scheduler.get_last_lr()[0])  # torchao optimizers keep lr as a tensor
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss_value = step_loss.item()
            loss_curve.append({"step": step, "loss": step_loss_value, "learning_rate": learning_rate})
            losses_since_report.append(step_loss_value)
            if step % spec.training.logging_steps == 0 or step == total_steps:
                train_seconds = time.perf_counter() - train_start
                on_progress(
                    Progress(
                        step=step,
                        total_steps=total_steps,
                        epoch=micro_steps / micro_per_epoch,
                        loss=sum(losses_since_report) / len(losses_since_report),
                        learning_rate=learning_rate,
                        tokens_per_second=tokens_seen / max(train_seconds, 1e-9),
                        eta_seconds=(total_steps - step) * train_seconds / step,
                        memory_allocated_bytes=memory.allocated_bytes(),
                        memory_reserved_bytes=memory.reserved_bytes(),
                        memory_peak_bytes=memory.peak_bytes(),
                        eval_loss=_eval(step),
                        tokens_seen=tokens_seen,
                    )
                )
                losses_since_report.clear()
            epoch_ended = micro_steps // micro_per_epoch > (micro_steps - accumulation) // micro_per_epoch
            if checkpoints.due(step, total_steps, epoch_ended):
                state = checkpoint.RunState(
                    step, micro_steps, tokens_seen, time.perf_counter() - train_start, loss_curve, losses_since_report
                )
                on_checkpoint(step, checkpoints.save(state, model, optimizer, scheduler, scaler))
                last_saved_step = step
        train_seconds = time.perf_counter() - train_start

        # --- save ---------------------------------------------------------------------------------------
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        written = _save_model(spec, model, plan, output_dir) + _save_dir(tokenizer, output_dir, "tokenizer")
        written += extras.save_merged(spec, Path(base_model_dir), output_dir, _save_dir)
        written += extras.save_tokenizer_beside_model(tokenizer, output_dir, written)
    except torch.OutOfMemoryError as exc:
        peak = memory.peak_bytes()
        peak_text = f" (peak reserved {peak / 2**30:.2f} GiB)" if peak else ""
        raise TrainingOutOfMemory(
            f"ran out of {device.type} memory at step {step}{peak_text}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'out of memory'}"
        ) from exc

    tokens_per_second = tokens_seen / max(train_seconds, 1e-9)
    summary = {
        "method": spec.method.value,
        "base_model": spec.base_model,
        "device": str(device),
        "precision": spec.memory.precision.value,
        "optimizer": spec.memory.optimizer.value,
        "steps": total_steps,
        "micro_batch_size": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "epochs": micro_steps / micro_per_epoch,
        "examples": len(dataset),
        "examples_dropped_no_learned_tokens": dropped_examples,
        "trainable_parameters": sum(parameter.numel() for parameter in parameters),
        "validation_examples": len(validation),
        "eval_loss": eval_losses[-1]["eval_loss"] if eval_losses else None,
        "eval_curve": eval_losses,
        "packing": {"rows": len(dataset), "examples": source_examples} if spec.training.packing else None,
        "final_loss": loss_curve[-1]["loss"],
        "resumed_from_step": resumed.step,
        "loss_curve": loss_curve,
        "tokens": tokens_seen,
        "tokens_per_second": tokens_per_second,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - wall_start,
        "peak_memory_bytes": memory.peak_bytes(),
        "artifacts": sorted(written),
        "versions": _versions(),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    checkpoints.remove_all()  # the artifacts are saved: nothing is left to resume, and they are not artifacts
    return TrainResult(
        steps=total_steps,
        final_loss=summary["final_loss"],
        tokens_per_second=tokens_per_second,
        wall_seconds=time.perf_counter() - wall_start,
        peak_memory_bytes=summary["peak_memory_bytes"],
        artifacts=sorted(written + ["summary.json"]),
    )


def _save_model(spec: JobSpec, model, plan: loading.PrecisionPlan, output_dir: Path) -> list[str]:
    """Adapters for lora/qlora (adapter/), the whole model for full/freeze (model/); safetensors only."""
    if spec.method in (Method.lora, Method.qlora):
        return extras.save_adapter(spec, model, output_dir, _save_dir)
    if spec.method is Method.freeze:
        # One dtype per checkpoint: the trained layers go back to the frozen layers' dtype.
        model.to(plan.frozen_dtype)
    return _save_dir(model, output_dir, "model")


def _save_dir(saveable, output_dir: Path, name: str) -> list[str]:
    target = output_dir / name
    saveable.save_pretrained(target)  # transformers 5 and peft 0.21 write safetensors by default
    return [path.relative_to(output_dir).as_posix() for path in sorted(target.rglob("*")) if path.is_file()]


def _versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }
