"""training.padding_free: a micro-batch runs as one row of its examples end to end (data.collate_flat) under
varlen attention (worker/training/attention.py), with no padding and no mask, and trains exactly as the padded
batches do. On the CPU the attention is one causal sdpa per example; CUDA's varlen_attn runs on a GPU only."""

from __future__ import annotations

import json

import pytest
import torch

from worker.training import data
from worker.training.attention import VARLEN_ATTENTION
from worker.training.loss import loss_sum
from worker.training.recipe import train

CPU = torch.device("cpu")
FP32 = {"precision": "fp32", "optimizer": "adamw"}


def example(first: int, length: int) -> data.TokenizedExample:
    tokens = [(first + index) % 200 + 3 for index in range(length)]
    return data.TokenizedExample(tokens, tokens)


def test_a_flat_batch_holds_exactly_its_examples_tokens():
    plain = example(0, 6)
    packed = data.pack_examples([example(50, 4), example(90, 3)], max_seq_length=16, seed=0)[0]
    batch = data.collate_flat([plain, packed], CPU)
    assert batch["input_ids"].shape == (1, 13)  # 6 + 4 + 3 tokens, not 2 rows padded to 7
    lengths = [6, *sorted((4, 3), reverse=True)]  # first-fit-decreasing puts the longer example first
    assert batch["cu_seq_lens_q"].tolist() == [0, 6, 10, 13] and batch["max_length_q"] == 6
    assert batch["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [0, 6, 10]
    assert [batch["labels"][0, s].item() for s in starts] == [data.IGNORE_INDEX] * 3  # never a cross-example target
    assert "attention_mask" not in batch


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def padded_and_flat(model, rows, *, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model.set_attn_implementation("sdpa")
    padded = loss_sum(model, data.collate_any(rows, 0, CPU), fused=fused)
    model.set_attn_implementation(VARLEN_ATTENTION)
    try:
        flat = loss_sum(model, data.collate_any(rows, 0, CPU, flat=True), fused=fused)
    finally:
        model.set_attn_implementation("sdpa")
    return padded, flat


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-loss"])
def test_flat_loss_and_gradients_equal_the_padded_batch(llama, fused):
    """Right-padded rows of 9, 3 and 14 tokens (GQA: 4 query heads, 2 kv heads) against one row of 26."""
    rows = [example(0, 9), example(30, 3), example(60, 14)]
    padded, flat = padded_and_flat(llama, rows, fused=fused)
    torch.testing.assert_close(flat, padded, rtol=1e-6, atol=1e-5)
    grads = []
    for collated, implementation in ((data.collate_any(rows, 0, CPU), "sdpa"),
                                     (data.collate_flat(rows, CPU), VARLEN_ATTENTION)):  # fmt: skip
        llama.zero_grad()
        llama.set_attn_implementation(implementation)
        loss_sum(llama, collated, fused=fused).backward()
        grads.append({name: p.grad.clone() for name, p in llama.named_parameters()})
    llama.set_attn_implementation("sdpa")
    llama.zero_grad()
    worst = max((grads[0][name] - grads[1][name]).abs().max().item() for name in grads[0])
    assert worst < 1e-5, worst


def test_packed_rows_flat_equal_packed_rows_masked(llama):
    """Packing without padding-free runs a block-diagonal [b, 1, s, s] mask; flat, no mask at all."""
    packed = data.pack_examples([example(i * 17, n) for i, n in enumerate((7, 11, 4, 9, 5))], 16, seed=1)
    assert len(packed) > 1
    padded, flat = padded_and_flat(llama, packed, fused=False)
    torch.testing.assert_close(flat, padded, rtol=1e-6, atol=1e-5)


def test_a_sliding_window_bounds_each_example(tmp_path):
    """Mistral with a 4-token window: the varlen path applies it inside examples longer than it."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa",
    )  # fmt: skip
    model = MistralForCausalLM(config).eval()
    rows = [example(0, 10), example(40, 3)]
    with torch.no_grad():
        alone = sum(loss_sum(model, data.collate([row], 0, CPU), fused=False) for row in rows)
        model.set_attn_implementation(VARLEN_ATTENTION)
        flat = loss_sum(model, data.collate_flat(rows, CPU), fused=False)
    torch.testing.assert_close(flat, alone, rtol=1e-6, atol=1e-5)


def test_a_batch_that_is_not_flat_is_refused(llama):
    llama.set_attn_implementation(VARLEN_ATTENTION)
    try:
        with pytest.raises(ValueError, match="collate_flat"):
            loss_sum(llama, data.collate([example(0, 5)], 0, CPU), fused=False)
    finally:
        llama.set_attn_implementation("sdpa")


def test_a_padding_free_run_trains_as_the_padded_one(make_spec, tiny_llama, memorise_dataset, tmp_path):
    """The whole recipe, packed and accumulated, validation included: the same losses at every step."""
    training = {"max_steps": 4, "micro_batch_size": 3, "gradient_accumulation_steps": 2, "validation_fraction": 0.25}
    runs = {}
    for padding_free in (False, True):
        for packing in (False, True):
            spec = make_spec(
                "lora",
                training=training | {"packing": packing, "padding_free": padding_free, "max_seq_length": 96},
                memory=FP32,
                lora={"dropout": 0.0},
            )
            out = tmp_path / f"{padding_free}-{packing}"
            train(spec, base_model_dir=tiny_llama, dataset_path=memorise_dataset, output_dir=out)
            runs[padding_free, packing] = json.loads((out / "summary.json").read_text())
    for packing in (False, True):
        padded, flat = runs[False, packing], runs[True, packing]
        curves = [[point["loss"] for point in run["loss_curve"]] for run in (padded, flat)]
        assert max(abs(a - b) for a, b in zip(*curves, strict=True)) < 1e-5
        assert abs(padded["eval_loss"] - flat["eval_loss"]) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen_attn (FlashAttention-2) runs on CUDA only")
def test_flash_varlen_on_cuda_equals_the_padded_batch(tiny_llama):
    from transformers import AutoModelForCausalLM

    cuda = torch.device("cuda")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = model.to(cuda).eval()
    rows = [example(0, 9), example(30, 3), example(60, 14)]
    with torch.no_grad():
        padded = loss_sum(model, data.collate_any(rows, 0, cuda), fused=False)
        model.set_attn_implementation(VARLEN_ATTENTION)
        flat = loss_sum(model, data.collate_flat(rows, cuda), fused=False)
    torch.testing.assert_close(flat, padded, rtol=2e-2, atol=2e-2)  # bf16 kernels: close, not equal
