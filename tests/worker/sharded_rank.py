"""One rank of tests/worker/test_sharded.py: trains the tiny model a few steps on fixed batches and writes the
losses and the final weights. Under torchrun (WORLD_SIZE > 1) the model is FSDP2-sharded and each rank takes its
share of every global batch; run plainly, it is the single-device reference on the whole global batch."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from domain.spec import JobSpec
from worker.training import loading
from worker.training.sharded import ShardedStrategy, shard_model
from worker.training.strategy import SingleDeviceStrategy

GLOBAL_BATCH, SEQ, STEPS = 4, 32, 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--method", default="full")
    parser.add_argument("--sharding", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    torch.set_num_threads(1)  # same kernels in every process: comparable sums
    resources = {"num_gpus": world, "sharding": args.sharding} if world > 1 else {}
    spec = JobSpec(
        base_model=str(args.model),
        method=args.method,
        training={"learning_rate": 1e-3},
        memory={"precision": "bf16-mixed", "optimizer": "adamw"},
        resources=resources,
        **({"freeze": {"trainable_layers": 1}} if args.method == "freeze" else {}),
    )
    cpu = torch.device("cpu")
    model = loading.load_model(spec, args.model, cpu, loading.precision_plan(spec.memory.precision))
    if world > 1:
        shard_model(spec, model)
        assert all(isinstance(p, DTensor) for p in model.parameters())  # every parameter a shard
    optimizer = loading.model_optimizer(spec, model, cpu)
    strategy = (ShardedStrategy if world > 1 else SingleDeviceStrategy)(spec, model, optimizer, None)
    losses = []
    # One fixed global batch, learned by heart: the loss falls fast, so a broken step shows.
    ids = torch.randint(0, model.config.vocab_size, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mine = ids[rank::world]  # every rank its share of the global batch; equal token counts
    for _ in range(STEPS):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=mine, labels=mine).loss
        strategy.backward(loss)
        strategy.step(loading.MAX_GRAD_NORM)
        strategy.zero_grad()
        reported = loss.detach().float()
        if world > 1:
            dist.all_reduce(reported, op=dist.ReduceOp.AVG)
        losses.append(reported.item())
    weights = strategy.trainable_state_dict()
    written = strategy.save_artifacts(loading.precision_plan(spec.memory.precision), args.out / "artifacts")
    assert written if rank == 0 else written == []  # rank 0 writes the one consolidated artifact
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "losses.json").write_text(json.dumps(losses))
        save_file({k: v.float().contiguous() for k, v in weights.items()}, args.out / "weights.safetensors")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
