"""Build a tiny but real causal LM (tokenizer + random weights) entirely offline.

Tests, the demo and smoke checks need a model that goes through exactly the same code paths as a real one
(AutoTokenizer / AutoModelForCausalLM loading, chat templates, bitsandbytes quantisation, peft) without
downloading anything. `build_tiny_model` trains a ~1k-token byte-level BPE on the shipped demo data, wraps it
as a transformers fast tokenizer with a real chat template, builds a 2-layer Llama or Qwen2 with seeded random
weights, and saves both with `save_pretrained` (safetensors). It is deterministic and takes about a second.

The chat templates mark assistant turns with `{% generation %}` so the trainer can ask transformers for the
assistant-token mask; they are also prefix-stable, so masking by rendering prefixes works as well.
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DATA_DIR = Path(__file__).parent / "demo_data"
DEMO_INSTRUCTIONS = DEMO_DATA_DIR / "instructions.jsonl"

# Llama 3 style: header tokens around the role, <|eot_id|> ends every turn, BOS opens the conversation.
LLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# ChatML, as Qwen2 uses it. No BOS token (Qwen2 has none); <|im_end|> is the end of a turn and the EOS.
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenisation regex (digits one by one, letters in runs), copied from transformers' Qwen2Tokenizer.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

_ARCHS = {
    "llama": {
        "special_tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "chat_template": LLAMA_CHAT_TEMPLATE,
    },
    "qwen2": {
        "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "chat_template": CHATML_CHAT_TEMPLATE,
    },
}


def demo_texts() -> list[str]:
    """Every string in the demo instructions: the corpus the tiny tokenizer is trained on."""
    texts = []
    for line in DEMO_INSTRUCTIONS.read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.extend(value for value in json.loads(line).values() if isinstance(value, str) and value)
    return texts


def build_tiny_tokenizer(arch: str = "llama", *, vocab_size: int = 1024):
    """A byte-level BPE trained on the demo data, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    choice = _ARCHS[arch]
    bpe = Tokenizer(models.BPE())
    # Byte level: every string is encodable (no unknown token), as in Llama 3 and Qwen2.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if arch == "qwen2":
        # AutoTokenizer loads a qwen2 model's tokenizer as Qwen2Tokenizer, which imposes this normaliser and
        # pre-tokeniser; train with the same ones so the saved merges mean the same thing once loaded.
        bpe.normalizer = normalizers.NFC()
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=choice["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Role names are in the corpus so that "assistant" and "user" get merged like in a real vocabulary.
    bpe.train_from_iterator(demo_texts() + ["system", "user", "assistant"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=choice["bos"],
        eos_token=choice["eos"],
        pad_token=choice["pad"],
        model_max_length=2048,
        padding_side="right",
    )
    tokenizer.chat_template = choice["chat_template"]
    return tokenizer


def build_tiny_model(
    out_dir: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    dtype: str = "bfloat16",
) -> Path:
    """Save a tiny tokenizer + randomly initialised model (seeded) into out_dir and return out_dir.

    arch is "llama" (LlamaForCausalLM, Llama 3 chat format) or "qwen2" (Qwen2ForCausalLM, ChatML).
    Weights are saved in `dtype` (bf16 by default, as real checkpoints ship).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in _ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_ARCHS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(arch, vocab_size=vocab_size)

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        arch
    ]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # fork_rng: seed the weights without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model = model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":  # python -m ftjobs.tinymodel OUT_DIR [llama|qwen2]
    import sys

    print(build_tiny_model(Path(sys.argv[1]), *(sys.argv[2:3] or ["llama"])))
