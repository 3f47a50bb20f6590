"""worker.training.data: chat templates, assistant-only labels, truncation, padding."""

from __future__ import annotations

import shutil

import pytest
import torch

from domain.datasets import Example, Message
from domain.errors import InvalidDataset
from worker.training import data

TWO_TURNS = Example(
    line=1,
    messages=(
        Message("system", "Be brief."),
        Message("user", "What is 2 plus 2?"),
        Message("assistant", "4."),
        Message("user", "And 3 plus 3?"),
        Message("assistant", "6."),
    ),
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tokenizer(request, tiny_llama, tiny_qwen2):
    return data.load_tokenizer(tiny_llama if request.param == "llama" else tiny_qwen2)


def learned_text(tokenizer, tokenized) -> str:
    return tokenizer.decode([label for label in tokenized.labels if label != data.IGNORE_INDEX])


def test_only_assistant_turns_are_learned(tokenizer):
    tokenized = data.tokenize_example(tokenizer, TWO_TURNS, max_seq_length=512)
    eot = "<|eot_id|>" if tokenizer.bos_token else "<|im_end|>\n"
    assert learned_text(tokenizer, tokenized) == f"4.{eot}6.{eot}"
    assert (
        tokenized.input_ids
        == tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in TWO_TURNS.messages],
            tokenize=True,
            return_dict=True,
        )["input_ids"]
    )


def test_prefix_rendering_matches_generation_marks(tokenizer):
    conversation = [{"role": m.role, "content": m.content} for m in TWO_TURNS.messages]
    by_marks = data.assistant_token_mask(tokenizer, conversation, use_generation_tags=True)
    by_prefixes = data.assistant_token_mask(tokenizer, conversation, use_generation_tags=False)
    assert by_marks == by_prefixes


def test_template_without_marks_falls_back_to_prefixes(tiny_llama):
    tokenizer = data.load_tokenizer(tiny_llama)
    tokenizer.chat_template = tokenizer.chat_template.replace("{%- generation %}", "").replace(
        "{%- endgeneration %}", ""
    )
    tokenized = data.tokenize_example(tokenizer, TWO_TURNS, max_seq_length=512)
    assert learned_text(tokenizer, tokenized) == "4.<|eot_id|>6.<|eot_id|>"


def test_non_prefix_stable_template_is_refused(tiny_llama):
    tokenizer = data.load_tokenizer(tiny_llama)
    # Renders the message count first, so an earlier prefix is never a prefix of the whole.
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="prefix-stable"):
        data.tokenize_example(tokenizer, TWO_TURNS, max_seq_length=512)


def test_model_without_template_gets_the_fallback(tiny_llama, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):  # everything but the template
        shutil.copy(tiny_llama / name, tmp_path / name)
    tokenizer = data.load_tokenizer(tmp_path)
    assert tokenizer.chat_template == data.FALLBACK_CHAT_TEMPLATE
    tokenized = data.tokenize_example(tokenizer, TWO_TURNS, max_seq_length=512)
    assert tokenizer.decode(tokenized.input_ids).startswith("### System:\nBe brief.\n\n### User:\n")
    assert learned_text(tokenizer, tokenized) == "4.<|eot_id|>6.<|eot_id|>"


def test_text_learns_every_token(tokenizer):
    tokenized = data.tokenize_example(tokenizer, Example(line=1, text="Plain text."), max_seq_length=512)
    assert tokenized.labels == tokenized.input_ids
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert (tokenized.input_ids[0] == tokenizer.bos_token_id) == (tokenizer.bos_token_id is not None)


def test_truncation_and_dropping(tiny_llama):
    tokenizer = data.load_tokenizer(tiny_llama)
    long_prompt = Example(line=1, messages=(Message("user", "word " * 200), Message("assistant", "ok")))
    kept, dropped = data.tokenize_examples(tokenizer, [long_prompt, TWO_TURNS], max_seq_length=64)
    assert dropped == 1 and len(kept) == 1 and len(kept[0].input_ids) <= 64
    with pytest.raises(InvalidDataset, match="max_seq_length"):
        data.tokenize_examples(tokenizer, [long_prompt], max_seq_length=64)


def test_collate_pads_right_per_batch(tiny_llama):
    tokenizer = data.load_tokenizer(tiny_llama)
    short = data.tokenize_example(tokenizer, Example(line=1, text="Hi."), max_seq_length=512)
    long = data.tokenize_example(tokenizer, TWO_TURNS, max_seq_length=512)
    batch = data.collate([short, long], tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["input_ids"].shape == (2, len(long.input_ids))
    assert batch["attention_mask"][0].sum() == len(short.input_ids)
    assert (batch["input_ids"][0, len(short.input_ids) :] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, len(short.input_ids) :] == data.IGNORE_INDEX).all()


def test_step_windows_are_seeded_epochs_cut_by_the_effective_batch():
    dataset = list(range(10))
    first = data.step_windows(dataset, 2, 2, seed=3)
    epoch = [next(first) for _ in range(3)]
    assert [[len(micro) for micro in window] for window in epoch] == [[2, 2], [2, 2], [2]]
    assert sorted(item for window in epoch for micro in window for item in micro) == dataset
    again = data.step_windows(dataset, 2, 2, seed=3)
    assert [next(again) for _ in range(3)] == epoch
    # Half the micro-batch, twice the accumulation (an out-of-memory recovery): every step trains the same rows.
    recovered = data.step_windows(dataset, 1, 4, seed=3)
    for window in epoch + [next(first) for _ in range(3)]:
        rows = next(recovered)
        assert [item for micro in rows for item in micro] == [item for micro in window for item in micro]
        assert all(len(micro) == 1 for micro in rows)
    assert data.steps_per_epoch(10, 4) == 3
