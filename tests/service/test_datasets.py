"""domain.datasets: every format parses into normalised examples; the first bad row names its line."""

from __future__ import annotations

import json

import pytest

from domain.datasets import Message, iter_examples, validate_dataset
from domain.errors import DatasetNotFound, InvalidDataset
from service.errors import to_problem


def write_jsonl(path, rows) -> str:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi!", "system": "Be kind."},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
            {"from": "human", "value": "Bye"},
            {"from": "gpt", "value": "Goodbye"},
        ]
    },
]
MESSAGES = [
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    {
        "messages": [
            {"role": "system", "content": "Terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
        ],
        "id": "extra keys are ignored",
    },
]
TEXT = [{"text": "Once upon a time."}, {"text": "The end."}]


def test_alpaca_becomes_a_conversation(tmp_path):
    examples = list(iter_examples(write_jsonl(tmp_path / "d.jsonl", ALPACA), "alpaca"))
    assert examples[0].messages == (Message("user", "Add the numbers.\n\n2 and 3"), Message("assistant", "5"))
    assert examples[1].messages == (
        Message("system", "Be kind."),
        Message("user", "Say hi."),
        Message("assistant", "Hi!"),
    )
    assert [example.line for example in examples] == [1, 2]


def test_sharegpt_roles_are_mapped(tmp_path):
    (example,) = iter_examples(write_jsonl(tmp_path / "d.jsonl", SHAREGPT), "sharegpt")
    assert [message.role for message in example.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert example.messages[-1].content == "Goodbye"


def test_messages_and_text(tmp_path):
    messages = list(iter_examples(write_jsonl(tmp_path / "m.jsonl", MESSAGES), "messages"))
    assert messages[1].messages[0] == Message("system", "Terse.")
    texts = list(iter_examples(write_jsonl(tmp_path / "t.jsonl", TEXT), "text"))
    assert [example.text for example in texts] == ["Once upon a time.", "The end."]
    assert texts[0].is_text and not messages[0].is_text


def test_validate_counts_rows_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0], "", "   ", ALPACA[1], ""])
    assert validate_dataset(path, "alpaca") == 2


def test_byte_order_mark_is_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(TEXT[0]).encode() + b"\n")
    assert validate_dataset(path, "text") == 1


@pytest.mark.parametrize(
    "fmt, rows, line, reason",
    [
        ("alpaca", [ALPACA[0], "{not json", ALPACA[1]], 2, "not valid JSON"),
        ("alpaca", [ALPACA[0], ALPACA[1], {"instruction": "x"}], 3, "missing field 'output'"),
        ("alpaca", [{"instruction": "x", "output": 5}], 1, "'output' must be a string"),
        ("alpaca", [ALPACA[0], {"instruction": "  ", "output": "y"}], 2, "'instruction' is empty"),
        ("alpaca", [ALPACA[0], ["a", "list"]], 2, "expected a JSON object"),
        ("sharegpt", [SHAREGPT[0], {"conversations": []}], 2, "empty conversation"),
        ("sharegpt", [SHAREGPT[0], SHAREGPT[0], {"conversations": [{"from": "bot", "value": "x"}]}], 3, "unknown from"),
        ("sharegpt", [{"conversations": [{"from": "human", "value": "only a question"}]}], 1, "no assistant turn"),
        ("sharegpt", [{"conversations": [{"from": "human"}]}], 1, "missing 'value'"),
        ("messages", [MESSAGES[0], {"messages": [{"role": "robot", "content": "x"}]}], 2, "unknown role"),
        (
            "messages",
            [MESSAGES[0], MESSAGES[1], {"messages": [{"role": "user", "content": ["x"]}]}],
            3,
            "must be a string",
        ),
        (
            "messages",
            [
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "system", "content": "late"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ],
            1,
            "system message may only come first",
        ),
        ("messages", [{"messages": "hello"}], 1, "must be an array"),
        ("text", [TEXT[0], TEXT[1], {"content": "wrong key"}], 3, "missing field 'text'"),
        ("text", [TEXT[0], {"text": None}], 2, "'text' must be a string"),
    ],
)
def test_first_malformed_row_is_reported_with_its_line(tmp_path, fmt, rows, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidDataset) as caught:
        validate_dataset(path, fmt)
    assert caught.value.line == line
    assert reason in str(caught.value)
    assert to_problem(caught.value)["line"] == line


def test_blank_lines_count_towards_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [TEXT[0], "", "[1]"])
    with pytest.raises(InvalidDataset) as caught:
        validate_dataset(path, "text")
    assert caught.value.line == 3


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(TEXT[0]).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(InvalidDataset) as caught:
        validate_dataset(path, "text")
    assert caught.value.line == 2 and "UTF-8" in str(caught.value)


def test_empty_file_is_invalid(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InvalidDataset, match="no rows"):
        validate_dataset(path, "alpaca")


def test_missing_file(tmp_path):
    with pytest.raises(DatasetNotFound):
        validate_dataset(tmp_path / "nope.jsonl", "alpaca")


def test_shipped_demo_dataset_is_valid():
    from ftjobs.tinymodel import DEMO_INSTRUCTIONS

    assert 150 <= validate_dataset(DEMO_INSTRUCTIONS, "alpaca") <= 300


def test_module_stays_pure_python():
    import subprocess
    import sys

    code = (
        "import sys, domain.datasets; heavy = {'torch', 'transformers', 'numpy'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


USER = [{"role": "user", "content": "Sky colour?"}]
BLUE, CAT = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "A cat."}]
PAIR_TEXT = {"prompt": "Sky colour? ", "chosen": "Blue.", "rejected": "A cat."}
PAIR_CHAT = {"prompt": USER, "chosen": BLUE, "rejected": CAT}
OPENAI_PAIR = {"input": {"messages": USER}, "preferred_output": BLUE, "non_preferred_output": CAT}
KTO_ROW = {"prompt": "Sky colour? ", "completion": "Blue.", "label": True}


@pytest.mark.parametrize(
    "fmt, rows, line, reason",
    [
        ("preference", [PAIR_TEXT, {"prompt": "q", "chosen": "a"}], 2, "missing field 'rejected'"),
        ("preference", [PAIR_TEXT, PAIR_TEXT, {**PAIR_TEXT, "chosen": 3}], 3, "'chosen' must be a string"),
        ("preference", [{**PAIR_TEXT, "rejected": "Blue."}], 1, "the chosen and rejected completions are the same"),
        ("preference", [{**PAIR_TEXT, "prompt": 7}], 1, "must be a string or an array of messages"),
        ("preference", [PAIR_CHAT, {**PAIR_CHAT, "prompt": USER + BLUE}], 2, "must end with a user message"),
        ("preference", [{**PAIR_CHAT, "chosen": USER}], 1, "'chosen' must hold assistant messages only"),
        ("preference", [{**PAIR_CHAT, "rejected": []}], 1, "'rejected' must be a non-empty array"),
        ("openai_preference", [OPENAI_PAIR, {**OPENAI_PAIR, "input": USER}], 2, "'input' must be an object"),
        ("openai_preference", [{"input": {"messages": USER}, "preferred_output": BLUE}], 1,
         "missing field 'non_preferred_output'"),
        ("openai_preference", [{**OPENAI_PAIR, "preferred_output": [{"role": "robot", "content": "x"}]}], 1,
         "unknown role"),
        ("openai_preference", [OPENAI_PAIR, {**OPENAI_PAIR, "non_preferred_output": BLUE}], 2, "nothing to prefer"),
        ("kto", [KTO_ROW, {**KTO_ROW, "label": "yes"}], 2, "'label' must be true or false"),
        ("kto", [KTO_ROW, KTO_ROW, {"prompt": "q", "label": False}], 3, "missing field 'completion'"),
        ("kto", [{"prompt": USER, "completion": USER, "label": False}], 1, "assistant messages only"),
    ],
)  # fmt: skip
def test_a_malformed_preference_row_is_reported_with_its_line(tmp_path, fmt, rows, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(InvalidDataset) as caught:
        validate_dataset(path, fmt)
    assert caught.value.line == line and reason in str(caught.value), str(caught.value)


def test_preference_rows_parse_as_pairs_and_labelled_completions(tmp_path):
    [text] = iter_examples(write_jsonl(tmp_path / "a.jsonl", [PAIR_TEXT]), "preference")
    [chat] = iter_examples(write_jsonl(tmp_path / "b.jsonl", [OPENAI_PAIR]), "openai_preference")
    [kto] = iter_examples(write_jsonl(tmp_path / "c.jsonl", [KTO_ROW]), "kto")
    assert (text.prompt, text.chosen, text.rejected) == ("Sky colour? ", "Blue.", "A cat.")
    assert chat.prompt == (Message("user", "Sky colour?"),) and chat.rejected == (Message("assistant", "A cat."),)
    assert (kto.completion, kto.label, kto.line) == ("Blue.", True, 1)
