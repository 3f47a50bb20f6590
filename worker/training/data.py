"""Examples -> token ids and labels -> padded micro-batches.

Conversations go through the tokenizer's own chat template, so the fine-tuned model sees exactly the format
it will be prompted with. Only assistant tokens are learned (labels are -100 elsewhere). Two ways to find them:

1. The template marks assistant turns with {% generation %}: transformers returns the assistant-token mask.
2. Otherwise (most released templates), render prefixes: the assistant turn i spans the characters between
   render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]); tokens whose first character
   falls in a span are learned. This needs a prefix-stable template, which is checked, not assumed.

The text format learns every token: [BOS] text EOS. Sequences are truncated at max_seq_length; an example
left with no learned token (its answer was truncated away) is dropped and counted.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from domain.datasets import Example, LabeledExample
from domain.errors import InvalidDataset

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# For a base model that ships no chat template: a plain, prefix-stable format with generation marks.
FALLBACK_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}{{- '\\n\\n' }}"
    "{%- else %}{{- message['content'] + '\\n\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def learned_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])  # the first token is never predicted

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenizedPair:
    """A preference example: the prompt followed by each completion; only the completions' tokens are learned.
    `index` is the pair's place in its dataset, where its precomputed reference log-probabilities are kept."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    index: int

    @property
    def sequences(self) -> tuple[TokenizedExample, TokenizedExample]:
        return self.chosen, self.rejected

    @property
    def learned_tokens(self) -> int:
        return self.chosen.learned_tokens + self.rejected.learned_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass(frozen=True)
class TokenizedLabeled:
    """A KTO example: its prompt and completion, and `mismatched`, its prompt followed by the next example's
    completion (in dataset order, fixed at tokenization so a precomputed reference can score it once): the policy's
    KL from the reference is estimated on those."""

    completion: TokenizedExample
    mismatched: TokenizedExample
    label: bool
    index: int

    @property
    def sequences(self) -> tuple[TokenizedExample, TokenizedExample]:
        return self.completion, self.mismatched

    @property
    def learned_tokens(self) -> int:
        return self.completion.learned_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.completion.input_ids) + len(self.mismatched.input_ids)


Scored = TokenizedPair | TokenizedLabeled  # what a preference objective trains on: two sequences per example


def first_rows(examples: Sequence[Scored]) -> list[TokenizedExample]:
    return [example.sequences[0] for example in examples]


def second_rows(examples: Sequence[Scored]) -> list[TokenizedExample]:
    return [example.sequences[1] for example in examples]


def num_tokens(example: TokenizedExample | Scored) -> int:
    return len(example.input_ids) if isinstance(example, TokenizedExample) else example.num_tokens


def load_tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token_id is None:
        # Llama 3 style tokenizers ship without one. Padding is masked out of attention and loss anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize_examples(
    tokenizer, examples: Sequence[Example], max_seq_length: int
) -> tuple[list[TokenizedExample], int]:
    """Tokenize every example; return the kept ones and how many were dropped for having nothing to learn."""
    kept = []
    for example in examples:
        tokenized = tokenize_example(tokenizer, example, max_seq_length)
        if tokenized.learned_tokens > 0:
            kept.append(tokenized)
    if not kept:
        raise InvalidDataset(f"no example keeps a token to learn within max_seq_length={max_seq_length}")
    return kept, len(examples) - len(kept)


def tokenize_example(tokenizer, example: Example, max_seq_length: int) -> TokenizedExample:
    if example.is_text:
        input_ids, mask = _tokenize_text(tokenizer, example.text)
    else:
        conversation = [{"role": message.role, "content": message.content} for message in example.messages]
        input_ids, mask = assistant_token_mask(tokenizer, conversation)
    input_ids, mask = input_ids[:max_seq_length], mask[:max_seq_length]
    labels = [token if learned else IGNORE_INDEX for token, learned in zip(input_ids, mask, strict=False)]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def tokenize_scored(tokenizer, examples: Sequence, max_seq_length: int, first_index: int = 0) -> tuple[list, int]:
    """Tokenize preference (PreferenceExample) or KTO (LabeledExample) rows; return the kept ones, indexed from
    first_index (where their precomputed reference log-probabilities lie), and how many were dropped because
    truncation left a completion with no token."""
    if examples and isinstance(examples[0], LabeledExample):
        return _tokenize_labeled(tokenizer, examples, max_seq_length, first_index)
    kept: list[TokenizedPair] = []
    for example in examples:
        chosen = tokenize_completion(tokenizer, example.prompt, example.chosen, max_seq_length)
        rejected = tokenize_completion(tokenizer, example.prompt, example.rejected, max_seq_length)
        if chosen.learned_tokens and rejected.learned_tokens:
            kept.append(TokenizedPair(chosen, rejected, index=first_index + len(kept)))
    if not kept:
        raise InvalidDataset(f"no pair keeps a completion token within max_seq_length={max_seq_length}")
    return kept, len(examples) - len(kept)


def _tokenize_labeled(tokenizer, examples: Sequence[LabeledExample], max_seq_length: int, first_index: int):
    if len({isinstance(example.prompt, str) for example in examples}) > 1:
        raise InvalidDataset("kto rows mix text and message prompts: a mismatched pair would join the two kinds")
    scored = [(ex, tokenize_completion(tokenizer, ex.prompt, ex.completion, max_seq_length)) for ex in examples]
    kept = [(example, tokenized) for example, tokenized in scored if tokenized.learned_tokens]
    if len(kept) < 2:
        raise InvalidDataset(
            f"kto needs at least 2 rows with a completion token within max_seq_length={max_seq_length}: "
            "its KL estimate pairs each prompt with another row's completion"
        )
    labeled = []
    for position, (example, tokenized) in enumerate(kept):
        partner = kept[(position + 1) % len(kept)][0]
        mismatched = tokenize_completion(tokenizer, example.prompt, partner.completion, max_seq_length)
        labeled.append(TokenizedLabeled(tokenized, mismatched, example.label, index=first_index + position))
    return labeled, len(examples) - len(kept)


def tokenize_completion(tokenizer, prompt, completion, max_seq_length: int) -> TokenizedExample:
    """The prompt and one completion as one sequence, learned from where the completion starts: where the prompt's
    own tokens stop being a prefix of the whole (as TRL finds it: a template or a merge may change the boundary).
    Text: [BOS] prompt completion EOS. Messages: the chat template, the prompt rendered with its generation
    prompt, and only assistant tokens learned."""
    if isinstance(prompt, str):
        input_ids, mask = _tokenize_text(tokenizer, prompt + completion)
        prompt_ids = _tokenize_text(tokenizer, prompt)[0][:-1]  # without the EOS
    else:
        turns = [{"role": message.role, "content": message.content} for message in (*prompt, *completion)]
        input_ids, mask = assistant_token_mask(tokenizer, turns)
        prompt_turns = turns[: len(prompt)]
        prompt_text = tokenizer.apply_chat_template(prompt_turns, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    start = _common_prefix(prompt_ids, input_ids)
    input_ids, mask = input_ids[:max_seq_length], mask[:max_seq_length]
    labels = [
        token if learned and position >= start else IGNORE_INDEX
        for position, (token, learned) in enumerate(zip(input_ids, mask, strict=True))
    ]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _tokenize_text(tokenizer, text: str) -> tuple[list[int], list[bool]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    ids = ids + [tokenizer.eos_token_id]  # so the model learns where a document ends
    return ids, [True] * len(ids)


def assistant_token_mask(tokenizer, conversation: list[dict], *, use_generation_tags: bool | None = None):
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn."""
    if use_generation_tags is None:
        use_generation_tags = bool(_GENERATION_TAG.search(tokenizer.chat_template or ""))
    if use_generation_tags:
        encoded = tokenizer.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        return list(encoded["input_ids"]), [bool(flag) for flag in encoded["assistant_masks"]]
    return _mask_by_prefixes(tokenizer, conversation)


def _mask_by_prefixes(tokenizer, conversation: list[dict]) -> tuple[list[int], list[bool]]:
    def render(messages, add_generation_prompt=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    text = render(conversation)
    spans = []
    for index, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        before = render(conversation[:index], add_generation_prompt=True)
        through = render(conversation[: index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(
                "the chat template is not prefix-stable, so assistant turns cannot be located; "
                "mark them with {% generation %} in the template"
            )
        spans.append((len(before), len(through)))
    # The template writes BOS itself where the model wants one, so the tokenizer must not add another.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(start <= first_char < end for start, end in spans) for first_char, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def step_windows(
    dataset: Sequence[TokenizedExample], micro_batch_size: int, accumulation: int, seed: int
) -> Iterator[list[list[TokenizedExample]]]:
    """An endless stream of optimizer steps, each a list of micro-batches: every epoch is a fresh seeded shuffle,
    cut into windows of micro_batch_size x accumulation rows (the last one of an epoch may be smaller), and each
    window into micro-batches of micro_batch_size rows (its last one may be smaller).

    The windows depend only on the effective batch (the product), so a job re-planned after running out of memory,
    with half the micro-batch and twice the accumulation, trains on the same rows at every step, for the same number
    of steps, and resumes the same checkpoint (worker/execution.py)."""
    generator = torch.Generator().manual_seed(seed)
    window_rows = micro_batch_size * accumulation
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for start in range(0, len(order), window_rows):
            window = order[start : start + window_rows]
            yield [
                [dataset[index] for index in window[first : first + micro_batch_size]]
                for first in range(0, len(window), micro_batch_size)
            ]


def steps_per_epoch(dataset_size: int, rows_per_step: int) -> int:
    return -(-dataset_size // rows_per_step)


def collate(batch: Sequence[TokenizedExample], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence in this micro-batch (not to max_seq_length: no wasted compute)."""
    length = max(len(example.input_ids) for example in batch)
    return {
        "input_ids": _right_padded([e.input_ids for e in batch], length, pad_token_id, device),
        "labels": _right_padded([e.labels for e in batch], length, IGNORE_INDEX, device),
        "attention_mask": _right_padded([[1] * len(e.input_ids) for e in batch], length, 0, device),
    }


def _right_padded(rows: Sequence[Sequence[int]], length: int, fill: int, device: torch.device) -> torch.Tensor:
    out = torch.full((len(rows), length), fill, dtype=torch.long)
    for index, row in enumerate(rows):
        out[index, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(device)


# ---- validation split and sample packing -------------------------------------------------------------------
def split_validation(
    dataset: Sequence[TokenizedExample], fraction: float | None, seed: int
) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """(train, validation): a seeded shuffle holds out round(fraction x n) examples, at least one, and leaves at
    least one to train on. fraction None: everything trains."""
    if not fraction:
        return list(dataset), []
    if len(dataset) < 2:
        raise InvalidDataset("training.validation_fraction needs at least 2 examples with a token to learn")
    held = min(len(dataset) - 1, max(1, round(fraction * len(dataset))))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [dataset[i] for i in order[held:]], [dataset[i] for i in order[:held]]


@dataclass(frozen=True)
class PackedExample(TokenizedExample):
    """Several examples in one row. position_ids restart at 0 at every example: transformers' masking_utils
    (find_packed_sequence_indices) turns the restarts into a block-diagonal causal mask when the model gets
    position_ids and no attention_mask, so no token attends across examples (sdpa: an explicit bool mask; the
    labels of each example's first token are already -100-free of the previous one's context)."""

    position_ids: list[int] = ()
    examples: int = 1


def pack_examples(dataset: Sequence[TokenizedExample], max_seq_length: int, seed: int) -> list[PackedExample]:
    """First-fit-decreasing bins of at most max_seq_length tokens, after a seeded shuffle (so equal lengths do
    not always share a row). Every example already fits (tokenize truncates at max_seq_length)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda index: -len(dataset[index].input_ids))
    bins: list[list[TokenizedExample]] = []
    room: list[int] = []
    for index in order:
        example = dataset[index]
        size = len(example.input_ids)
        target = next((b for b, free in enumerate(room) if free >= size), None)
        if target is None:
            bins.append([]), room.append(max_seq_length)
            target = len(bins) - 1
        bins[target].append(example)
        room[target] -= size
    packed = []
    for members in bins:
        input_ids, labels, positions = [], [], []
        for example in members:
            input_ids += example.input_ids
            # The first token of an example is never a target of the previous one.
            labels += [IGNORE_INDEX] + example.labels[1:]
            positions += list(range(len(example.input_ids)))
        packed.append(PackedExample(input_ids=input_ids, labels=labels, position_ids=positions, examples=len(members)))
    return packed


def collate_packed(batch: Sequence[PackedExample], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad packed rows; the padding is one more segment (positions from 0, labels ignored). No
    attention_mask: position_ids carry the example boundaries."""
    length = max(len(example.input_ids) for example in batch)
    # the padding is a segment of its own, positions 0.. (so it never looks like a continuation of the last one)
    positions = [list(e.position_ids) + list(range(length - len(e.input_ids))) for e in batch]
    return {
        "input_ids": _right_padded([e.input_ids for e in batch], length, pad_token_id, device),
        "labels": _right_padded([e.labels for e in batch], length, IGNORE_INDEX, device),
        "position_ids": _right_padded(positions, length, 0, device),
    }


def collate_flat(batch: Sequence[TokenizedExample], device: torch.device) -> dict:
    """training.padding_free: every example of the micro-batch (a packed row's too) end to end in one row of
    exactly their tokens: no padding, and no mask. cu_seq_lens and max_length bound each example's attention
    (worker/training/attention.py); position_ids restart at 0 per example for the rotary embeddings."""
    input_ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    lengths: list[int] = []
    for example in batch:
        for start, end in _segments(example):
            input_ids += example.input_ids[start:end]
            # The first token of an example is never a target of the previous one's last token.
            labels += [IGNORE_INDEX] + example.labels[start + 1 : end]
            positions += range(end - start)
            lengths.append(end - start)
    cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long, device=device),
        "labels": torch.tensor([labels], dtype=torch.long, device=device),
        "position_ids": torch.tensor([positions], dtype=torch.long, device=device),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def _segments(example: TokenizedExample) -> list[tuple[int, int]]:
    """[start, end) of each example in a row: a packed row's restart where its position_ids return to 0."""
    if not isinstance(example, PackedExample):
        return [(0, len(example.input_ids))]
    starts = [index for index, position in enumerate(example.position_ids) if position == 0]
    return list(zip(starts, [*starts[1:], len(example.input_ids)], strict=True))


def collate_any(
    batch: Sequence[TokenizedExample], pad_token_id: int, device: torch.device, *, flat: bool = False
) -> dict:
    """flat: training.padding_free (collate_flat); else right-padded rows, packed or not."""
    if flat:
        return collate_flat(batch, device)
    if batch and isinstance(batch[0], PackedExample):
        return collate_packed(batch, pad_token_id, device)
    return collate(batch, pad_token_id, device)
