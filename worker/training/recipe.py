"""The training recipe, top to bottom: validate data -> setup_data -> setup_model -> setup_optimizer ->
precompute_reference (dpo/kto, reference precomputed) -> compile_layers -> resume -> train_loop (train_step, report,
save_checkpoint) -> save_artifacts -> finish (summary.json). The steps share one Run; backward, the optimizer step,
clipping, state dicts and the artifacts go through its strategy (worker/training/strategy.py), the one place that
knows how the model lies on the devices.

`train` is what the job process calls. It raises:
  InvalidDataset       a malformed row (checked before any model is loaded) or nothing left to learn
  JobCancelled         should_stop() answered True (checked before every micro-step)
  JobDrained           should_drain() answered True (checked before every optimizer step); a checkpoint of the
                       last completed step is saved first, so the job resumes there
  TrainingOutOfMemory  the accelerator (the host, on a CPU worker) ran out of memory (chained to torch's error)
  ValueError           a spec the planner should have resolved ("auto" batch size) or that cannot apply
                       to this model (more freeze layers than it has)
The precision mapping and LR schedule are documented in worker/training/loading.py, each optimizer and method in
its registry (worker/training/optimizers.py, methods.py); checkpoints,
and how a run resumes from the last one in output_dir/checkpoints, in worker/training/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from domain.datasets import iter_examples
from domain.errors import JobCancelled, JobDrained, TrainingOutOfMemory
from domain.messages import Progress
from domain.spec import JobSpec, Objective
from planner import policy
from worker.training import checkpoint, data, extras, kernels, loading, objectives, reference
from worker.training.memory import MemoryProbe, ran_out_of_memory
from worker.training.methods import decoder_layers
from worker.training.offload import activation_offload
from worker.training.ranks import Ranks
from worker.training.strategy import SingleDeviceStrategy


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float  # per-token loss of the last optimizer step
    tokens_per_second: float
    wall_seconds: float  # the whole call: validation, loading, training and saving
    peak_memory_bytes: int | None  # torch.cuda.max_memory_reserved on the GPU (the largest rank's), None on the CPU
    artifacts: list[str]  # paths relative to output_dir, '/'-separated, sorted


@dataclass(frozen=True)
class Hooks:
    """How the caller follows and steers the run (train's keyword arguments of the same names)."""

    on_progress: Callable[[Progress], None]
    should_stop: Callable[[], bool]
    should_drain: Callable[[], bool]
    on_checkpoint: Callable[[int, str], None]
    on_resume: Callable[[int], None]
    on_compiled: Callable[[float], None]  # seconds memory.compile_layers took, before the first step


@dataclass
class TrainData:
    tokenizer: object
    dataset: list  # tokenized (and packed) training rows
    validation: list
    dropped_examples: int  # examples with no learned token left after truncation
    source_examples: int  # training examples before packing
    micro_batch_size: int  # rows per rank; a global micro-batch is micro_batch_size x ranks
    steps_per_epoch: int
    total_steps: int
    stream: object  # the endless seeded stream of steps (lists of global micro-batches), the same on every rank


@dataclass
class Run:
    """Everything the steps of one run share; `state` is what a checkpoint saves and a resume restores."""

    spec: JobSpec
    device: torch.device
    plan: loading.PrecisionPlan
    memory: MemoryProbe
    data: TrainData
    strategy: SingleDeviceStrategy
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpoints: checkpoint.Checkpoints
    autocast: object
    fused_loss: bool
    ranks: Ranks
    activation_offload: contextlib.AbstractContextManager  # memory.offload_activations, around each forward
    objective: objectives.Sft | objectives.Dpo | objectives.Kto | objectives.Orpo
    stats: objectives.Stats = field(default_factory=objectives.Stats)  # preference metrics since the last report
    reference_info: reference.ReferenceInfo | None = None
    state: checkpoint.RunState = field(default_factory=checkpoint.RunState)
    step: int = 0  # the optimizer step being taken: what an out-of-memory error names
    train_start: float = 0.0
    train_seconds: float = 0.0
    resumed_from_step: int = 0
    last_saved_step: int = 0
    eval_losses: list[dict] = field(default_factory=list)
    compile_seconds: float | None = None

    def collate(self, rows: Sequence[data.TokenizedExample]) -> dict:
        pad_token_id = self.data.tokenizer.pad_token_id
        return data.collate_any(rows, pad_token_id, self.device, flat=self.spec.training.padding_free)


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
    on_compiled: Callable[[float], None] = lambda seconds: None,
    ranks: Ranks | None = None,  # a sharded job's ranks (worker/training/ranks.py); hooks matter on rank 0 only
) -> TrainResult:
    ranks = ranks or Ranks()
    wall_start = time.perf_counter()
    hooks = Hooks(on_progress, should_stop, should_drain, on_checkpoint, on_resume, on_compiled)
    micro_batch_size = spec.training.micro_batch_size
    if not isinstance(micro_batch_size, int):
        raise ValueError("micro_batch_size 'auto' must be resolved to a number before training")
    # Read and validate the whole dataset first: a malformed row fails in seconds, not after a model load.
    examples = list(iter_examples(dataset_path, spec.dataset_format))
    held_out = list(iter_examples(validation_path, spec.dataset_format)) if validation_path else None

    from transformers import set_seed

    set_seed(spec.training.seed)  # python, numpy and torch RNGs: LoRA init, dropout
    device = loading.pick_device()
    loading.check_device_support(spec, device)  # a CUDA-only optimizer on a CPU worker: refused before loading
    plan = loading.precision_plan(spec.memory.precision)
    memory = MemoryProbe(device)
    train_data = setup_data(spec, Path(base_model_dir), examples, held_out, micro_batch_size, ranks.world)
    output_dir = Path(output_dir)
    run = None
    try:
        model = setup_model(spec, Path(base_model_dir), device, plan)
        run = setup_run(spec, model, device, plan, memory, train_data, output_dir, ranks)
        precompute_reference(run, output_dir)
        compile_layers(run, hooks)
        resume(run, hooks)
        train_loop(run, hooks)
        written = save_artifacts(run, Path(base_model_dir), output_dir)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if not ran_out_of_memory(exc):
            raise
        raise _out_of_memory(exc, device, memory, run.step if run else 0) from exc
    return finish(run, written, output_dir, wall_seconds=time.perf_counter() - wall_start)


# ---- setup ------------------------------------------------------------------------------------------------------
def setup_run(spec: JobSpec, model, device, plan, memory, train_data: TrainData, output_dir: Path, ranks) -> Run:
    strategy, scheduler = setup_optimizer(spec, model, device, plan, train_data.total_steps)
    fused_loss = policy.fused_loss_enabled(spec) or kernels.has_liger_loss(model)
    kind = spec.reference
    return Run(
        spec,
        device,
        plan,
        memory,
        train_data,
        strategy,
        scheduler,
        checkpoints=checkpoint.Checkpoints(output_dir / "checkpoints", spec, train_data.steps_per_epoch, ranks),
        autocast=torch.autocast(device.type, dtype=plan.autocast_dtype)
        if plan.autocast_dtype
        else contextlib.nullcontext(),
        fused_loss=fused_loss,
        ranks=ranks,
        activation_offload=activation_offload(model, device, spec.memory.offload_activations),
        objective=objectives.build_objective(spec, fused_loss, reference.build_reference(kind, model, fused_loss)),
        reference_info=reference.ReferenceInfo(kind) if kind else None,
    )


def precompute_reference(run: Run, output_dir: Path) -> None:
    """reference 'precomputed': before step 1 (and before a resume restores trained weights), score every training
    and held-out example with the untrained model, or read the table an earlier attempt stored."""
    if run.spec.reference != "precomputed":
        return
    table, run.reference_info = reference.load_or_precompute(
        output_dir / reference.REFERENCE_FILE,
        run.strategy.model,
        run.data.dataset + run.data.validation,
        micro_batch_size=run.data.micro_batch_size,
        collate=run.collate,
        autocast=run.autocast,
        fused=run.fused_loss,
    )
    run.objective.reference = table


def setup_data(
    spec: JobSpec, base_model_dir: Path, examples, held_out, micro_batch_size: int, world: int = 1
) -> TrainData:
    """Every rank tokenizes the same rows and deals the same seeded global micro-batches (micro_batch_size x
    world rows), so N ranks step exactly as one rank on the global batch; each then trains its share."""
    training = spec.training
    tokenizer = data.load_tokenizer(base_model_dir)
    dataset, dropped_examples = _tokenize(spec, tokenizer, examples)
    if held_out is None:
        dataset, validation = data.split_validation(dataset, training.validation_fraction, training.seed)
    else:  # indexed after the training examples: a precomputed reference keeps both in one table
        validation, _ = _tokenize(spec, tokenizer, held_out, first_index=len(dataset))
    source_examples = len(dataset)
    if training.packing:
        dataset = data.pack_examples(dataset, training.max_seq_length, training.seed)
    accumulation = training.gradient_accumulation_steps
    per_epoch = data.steps_per_epoch(len(dataset), micro_batch_size * world * accumulation)
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * per_epoch))
    return TrainData(
        tokenizer=tokenizer,
        dataset=dataset,
        validation=validation,
        dropped_examples=dropped_examples,
        source_examples=source_examples,
        micro_batch_size=micro_batch_size,
        steps_per_epoch=per_epoch,
        total_steps=total_steps,
        stream=data.step_windows(dataset, micro_batch_size * world, accumulation, training.seed),
    )


def _tokenize(spec: JobSpec, tokenizer, examples, first_index: int = 0):
    if spec.objective is Objective.sft:
        return data.tokenize_examples(tokenizer, examples, spec.training.max_seq_length)
    return data.tokenize_scored(tokenizer, examples, spec.training.max_seq_length, first_index)


def setup_model(spec: JobSpec, base_model_dir: Path, device: torch.device, plan: loading.PrecisionPlan):
    model = loading.load_model(spec, base_model_dir, device, plan)
    if policy.compile_layers_enabled(spec):
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)  # one graph for every sequence length, not a recompile per new one
    if spec.resources.effective_sharding is not None:
        from worker.training.sharded import shard_model

        shard_model(spec, model)  # before the optimizer: it must step the DTensor shards
    return model


def setup_optimizer(spec: JobSpec, model, device: torch.device, plan: loading.PrecisionPlan, total_steps: int):
    optimizer = loading.model_optimizer(spec, model, device)
    scheduler = loading.build_schedule(optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type) if plan.grad_scaler else None
    if spec.resources.effective_sharding is None:
        return SingleDeviceStrategy(spec, model, optimizer, scaler), scheduler
    from worker.training.sharded import ShardedStrategy

    return ShardedStrategy(spec, model, optimizer, scaler), scheduler


def compile_layers(run: Run, hooks: Hooks) -> None:
    """memory.compile_layers: compile the layers' forward and backward now, on the first global micro-batch's rows,
    so the compile time is its own phase, not hidden in step 1. Nothing of it stays: its loss weighs 0, the
    gradients are dropped and the RNG states put back, so the run trains exactly as it would have."""
    if not policy.compile_layers_enabled(run.spec):
        return
    started, saved_rng = time.perf_counter(), checkpoint.rng_state()
    first = run.data.dataset[: run.data.micro_batch_size * run.ranks.world]
    rows = run.ranks.share(first) or first[:1]
    with run.autocast:
        loss = run.objective.loss(run.strategy.model, run.collate, rows, objectives.totals([rows]), objectives.Stats())
    run.strategy.backward(loss * 0)
    run.strategy.zero_grad()
    checkpoint.set_rng_state(saved_rng)
    run.compile_seconds = time.perf_counter() - started
    hooks.on_compiled(run.compile_seconds)


def resume(run: Run, hooks: Hooks) -> None:
    """A retried job (same output dir) carries on from its last complete checkpoint; a first run from 0."""
    run.state = run.checkpoints.resume(run.strategy, run.scheduler, run.data.stream)
    if run.state.step:
        hooks.on_resume(run.state.step)
    run.train_start = time.perf_counter() - run.state.train_seconds
    run.resumed_from_step = run.last_saved_step = run.state.step


# ---- train ------------------------------------------------------------------------------------------------------
def train_loop(run: Run, hooks: Hooks) -> None:
    total_steps = run.data.total_steps
    for step in range(run.state.step + 1, total_steps + 1):
        run.step = step
        if run.ranks.from_main(hooks.should_drain()):  # every rank stops at the same step
            if step - 1 > run.last_saved_step:
                save_checkpoint(run, hooks)
            raise JobDrained(f"drained after step {step - 1}")
        learning_rate = train_step(run, step, hooks.should_stop)
        report(run, step, learning_rate, hooks.on_progress)
        if run.checkpoints.due(step, total_steps, epoch_ended=step % run.data.steps_per_epoch == 0):
            save_checkpoint(run, hooks)
    run.train_seconds = time.perf_counter() - run.train_start


def train_step(run: Run, step: int, should_stop: Callable[[], bool]) -> float:
    """One optimizer step over its window's global micro-batches (gradient_accumulation_steps, fewer at an epoch's
    end); the learning rate it used."""
    state, ranks = run.state, run.ranks
    window = next(run.data.stream)
    # Normalise by the whole global step (its learned tokens, or examples), so accumulation over micro-batches and
    # ranks equals one big batch. FSDP averages gradients over the ranks, so each rank's share is scaled by the world.
    step_totals = objectives.totals(window)
    step_loss = torch.zeros((), device=run.device)
    for micro in window:
        if should_stop():
            raise JobCancelled(f"cancelled at step {step - 1}")
        rows, weight, stats = ranks.share(micro), ranks.world, run.stats
        if not rows:  # a short last micro-batch: this rank still runs the collectives, on a row that counts 0
            rows, weight, stats = micro[:1], 0, objectives.Stats()
        with run.autocast, run.activation_offload:
            loss = run.objective.loss(run.strategy.model, run.collate, rows, step_totals, stats)
        run.strategy.backward(loss * weight)
        step_loss += loss.detach() * (weight / ranks.world)
        state.tokens_seen += sum(data.num_tokens(example) for example in micro)  # host-side: no GPU sync

    run.strategy.step(loading.MAX_GRAD_NORM)
    learning_rate = float(run.scheduler.get_last_lr()[0])  # torchao optimizers keep lr as a tensor
    run.scheduler.step()
    run.strategy.zero_grad()

    step_loss_value = ranks.total(step_loss).item()  # the global batch's per-token loss
    state.loss_curve.append({"step": step, "loss": step_loss_value, "learning_rate": learning_rate})
    state.losses_since_report.append(step_loss_value)
    state.step = step
    return learning_rate


def report(run: Run, step: int, learning_rate: float, on_progress: Callable[[Progress], None]) -> None:
    total_steps, state = run.data.total_steps, run.state
    if step % run.spec.training.logging_steps != 0 and step != total_steps:
        return
    train_seconds = time.perf_counter() - run.train_start
    on_progress(
        Progress(
            step=step,
            total_steps=total_steps,
            epoch=state.step / run.data.steps_per_epoch,
            loss=sum(state.losses_since_report) / len(state.losses_since_report),
            learning_rate=learning_rate,
            tokens_per_second=state.tokens_seen / max(train_seconds, 1e-9),
            eta_seconds=(total_steps - step) * train_seconds / step,
            memory_allocated_bytes=run.memory.allocated_bytes(),
            memory_reserved_bytes=run.memory.reserved_bytes(),
            memory_peak_bytes=run.memory.peak_bytes(),
            eval_loss=evaluate(run, step),
            tokens_seen=state.tokens_seen,
            preference=_preference_report(run, step),
        )
    )
    state.losses_since_report.clear()


def evaluate(run: Run, step: int) -> float | None:
    """The held-out loss at ~10 evenly spaced reports and the last one; for dpo and orpo also the held-out
    preference accuracy (eval_losses[-1]["eval_accuracy"])."""
    if not run.data.validation or not extras.eval_due(step, run.data.total_steps):
        return None
    if run.spec.objective is Objective.sft:
        value = extras.eval_loss(
            run.strategy.model,
            run.data.validation,
            micro_batch_size=run.data.micro_batch_size,
            collate=run.collate,
            autocast=run.autocast,
            fused=run.fused_loss,
        )
        run.eval_losses.append({"step": step, "eval_loss": value})
        return value
    total, accuracy = objectives.evaluate(
        run.objective,
        run.strategy.model,
        run.data.validation,
        micro_batch_size=run.data.micro_batch_size,
        collate=run.collate,
        autocast=run.autocast,
    )
    run.eval_losses.append({"step": step, "eval_loss": total, "eval_accuracy": accuracy})
    return total


def _preference_report(run: Run, step: int) -> dict[str, float] | None:
    """The preference metrics since the last report, with this report's held-out accuracy when it evaluated."""
    report = run.stats.report()
    if report is not None and run.eval_losses and run.eval_losses[-1]["step"] == step:
        accuracy = run.eval_losses[-1].get("eval_accuracy")
        if accuracy is not None:
            report["eval_accuracy"] = accuracy
    return report


# ---- save -------------------------------------------------------------------------------------------------------
def save_checkpoint(run: Run, hooks: Hooks) -> None:
    """A checkpoint of the last completed step (run.state.step)."""
    run.state.train_seconds = time.perf_counter() - run.train_start
    carry = run.checkpoints.root.parent / reference.REFERENCE_FILE if run.spec.reference == "precomputed" else None
    path = run.checkpoints.save(run.state, run.strategy, run.scheduler, carry=carry)
    hooks.on_checkpoint(run.state.step, path)
    run.last_saved_step = run.state.step


def save_artifacts(run: Run, base_model_dir: Path, output_dir: Path) -> list[str]:
    """adapter/ or model/ (the method's), tokenizer/, the merged model if asked; paths relative to output_dir."""
    tokenizer = run.data.tokenizer
    output_dir.mkdir(parents=True, exist_ok=True)
    written = run.strategy.save_artifacts(run.plan, output_dir)  # a collective on a sharded job
    if not run.ranks.is_main:
        return []
    written += extras.save_dir(tokenizer, output_dir, "tokenizer")
    written += extras.save_merged(run.spec, base_model_dir, output_dir, extras.save_dir)
    written += extras.save_tokenizer_beside_model(tokenizer, output_dir, written)
    return written


def finish(run: Run, written: list[str], output_dir: Path, *, wall_seconds: float) -> TrainResult:
    """summary.json, then the checkpoints go: the artifacts are saved, nothing is left to resume. On a sharded job
    rank 0 writes them; the peak is the largest rank's."""
    peaks = [peak for peak in run.ranks.every(run.memory.peak_bytes()) if peak is not None]
    summary = _summary(run, written, wall_seconds, max(peaks) if peaks else None)
    if run.ranks.is_main:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.checkpoints.remove_all()
    return TrainResult(
        steps=run.data.total_steps,
        final_loss=summary["final_loss"],
        tokens_per_second=summary["tokens_per_second"],
        wall_seconds=wall_seconds,
        peak_memory_bytes=summary["peak_memory_bytes"],
        artifacts=sorted(written + ["summary.json"]),
    )


def _summary(run: Run, written: list[str], wall_seconds: float, peak_memory_bytes: int | None) -> dict:
    spec, state, train_data = run.spec, run.state, run.data
    return {
        "method": spec.method.value,
        "base_model": spec.base_model,
        "device": str(run.device),
        "precision": spec.memory.precision.value,
        "optimizer": spec.memory.optimizer.value,
        "steps": train_data.total_steps,
        "micro_batch_size": train_data.micro_batch_size,
        "gradient_accumulation_steps": spec.training.gradient_accumulation_steps,
        "epochs": state.step / train_data.steps_per_epoch,
        "examples": len(train_data.dataset),
        "examples_dropped_no_learned_tokens": train_data.dropped_examples,
        "trainable_parameters": sum(parameter.numel() for parameter in run.strategy.trained.values()),
        "validation_examples": len(train_data.validation),
        "eval_loss": run.eval_losses[-1]["eval_loss"] if run.eval_losses else None,
        "eval_curve": run.eval_losses,
        "packing": {"rows": len(train_data.dataset), "examples": train_data.source_examples}
        if spec.training.packing
        else None,
        "final_loss": state.loss_curve[-1]["loss"],
        "resumed_from_step": run.resumed_from_step,
        "loss_curve": state.loss_curve,
        "tokens": state.tokens_seen,
        "tokens_per_second": state.tokens_seen / max(run.train_seconds, 1e-9),
        "train_seconds": run.train_seconds,
        "compile_seconds": run.compile_seconds,
        "liger_kernels": kernels.has_liger_loss(run.strategy.model),
        "padding_free": spec.training.padding_free,
        "objective": spec.objective.value,
        "reference": dataclasses.asdict(run.reference_info) if run.reference_info else None,
        "eval_accuracy": run.eval_losses[-1].get("eval_accuracy") if run.eval_losses else None,
        "wall_seconds": wall_seconds,
        "peak_memory_bytes": peak_memory_bytes,
        "ranks": run.ranks.world,
        "sharding": run.spec.resources.effective_sharding.value if run.spec.resources.effective_sharding else None,
        "artifacts": sorted(written),
        "versions": _versions(),
    }


def _out_of_memory(exc: BaseException, device: torch.device, memory: MemoryProbe, step: int) -> TrainingOutOfMemory:
    """The step it failed in (0: before the first), and the device's peak reserved (None on the CPU, where the
    job process adds its resident peak): what the worker re-plans the job against."""
    peak = memory.peak_bytes()
    peak_text = f" (peak reserved {peak / 2**30:.2f} GiB)" if peak else ""
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TrainingOutOfMemory(
        f"ran out of {device.type} memory at step {step}{peak_text}: {first_line}",
        step=step,
        device=device.type,
        measured_peak_bytes=peak,
    )


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
