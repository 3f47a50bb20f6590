"""ftjobs.tinymodel: a real tokenizer and model, built offline, deterministically."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftjobs.tinymodel import build_tiny_model

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic(tiny_llama, tmp_path):
    again = build_tiny_model(tmp_path / "again", arch="llama", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again / name) == digest(tiny_llama / name)
    other_seed = build_tiny_model(tmp_path / "other", arch="llama", seed=1)
    assert digest(other_seed / "model.safetensors") != digest(tiny_llama / "model.safetensors")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_round_trips(arch, tiny_llama, tiny_qwen2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama if arch == "llama" else tiny_qwen2)
    assert 500 <= len(tokenizer) <= 1024
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    for text in ["What is the capital of France?", "Spell 'café' backwards: éfac 123\n\tdone", "emoji 🙂"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # BPE merges are real: common words in the demo data are far shorter than their byte count.
    assert len(tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"]) < 15


def test_llama_chat_template(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and text.startswith(prompt)
    # Header tokens are single special tokens, as in Llama 3.
    assert len(tokenizer("<|start_header_id|>", add_special_tokens=False)["input_ids"]) == 1


def test_qwen2_chat_template_is_chatml(tiny_qwen2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n")
    assert tokenizer.bos_token is None and tokenizer.eos_token == "<|im_end|>"


def test_generation_marks_cover_the_assistant_answer(tiny_llama):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    encoded = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    answer = [token for token, flag in zip(encoded["input_ids"], encoded["assistant_masks"], strict=False) if flag]
    assert tokenizer.decode(answer) == "The capital of France is Paris.<|eot_id|>"


@pytest.mark.parametrize("arch, model_class", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_model_loads_and_runs(arch, model_class, tiny_llama, tiny_qwen2):
    path = tiny_llama if arch == "llama" else tiny_qwen2
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == model_class
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    config = model.config
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    ) == (64, 2, 4, 2, 128)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()
