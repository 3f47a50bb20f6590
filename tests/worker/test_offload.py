"""memory.offload_activations: what the forward saves for backward waits in host memory (on the CPU a copy
into other host memory: the same mechanism, checked for what it copies and that it trains exactly the same)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from worker.training.offload import ActivationOffload
from worker.training.recipe import train

CPU = torch.device("cpu")


def test_saved_activations_are_copied_and_frozen_weights_are_not():
    """x @ W.T with W frozen, plus a trainable low-rank path: autograd saves x (for A's grad) and x @ A.T (for
    B's grad), and W.t(), a view of the weight, for x's grad. Only the first two go to the host."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    model.a = torch.nn.Parameter(torch.randn(8, 64))
    model.b = torch.nn.Parameter(torch.randn(64, 8))
    x = torch.randn(32, 64, requires_grad=True)

    def forward():
        return (F.linear(x, model.weight) + F.linear(F.linear(x, model.a), model.b)).square().sum()

    forward().backward()
    expected = [t.grad.clone() for t in (x, model.a, model.b)]
    for t in (x, model.a, model.b):
        t.grad = None
    offload = ActivationOffload(model, CPU)
    with offload:
        loss = forward()
    assert offload.offloaded_bytes == (32 * 64 + 32 * 8 + 32 * 64) * 4  # x, x @ A.T, and the squared sum's input
    loss.backward()
    for got, want in zip((x.grad, model.a.grad, model.b.grad), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [True, False], ids=["gc", "no-gc"])
def test_an_offloaded_run_trains_exactly_as_the_plain_one(
    make_spec, tiny_llama, memorise_dataset, tmp_path, checkpointing
):
    runs = []
    for offload in (False, True):
        memory = {"precision": "fp32", "gradient_checkpointing": checkpointing, "offload_activations": offload}
        spec = make_spec("lora", training={"max_steps": 3}, memory=memory, lora={"dropout": 0.0})
        out = tmp_path / str(offload)
        train(spec, base_model_dir=tiny_llama, dataset_path=memorise_dataset, output_dir=out)
        runs.append([point["loss"] for point in json.loads((out / "summary.json").read_text())["loss_curve"]])
    assert runs[0] == runs[1]


def test_with_checkpointing_each_layer_input_goes_to_the_host(tiny_llama):
    """Non-reentrant checkpointing saves each layer's input through save_for_backward: the hooks see them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tokens = torch.randint(3, 200, (2, 48))
    offload = ActivationOffload(model, CPU)
    with offload:
        model(input_ids=tokens, labels=tokens).loss.backward()
    layer_inputs = model.config.num_hidden_layers * tokens.numel() * model.config.hidden_size * 4
    assert offload.offloaded_bytes >= layer_inputs
