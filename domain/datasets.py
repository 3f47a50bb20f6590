"""Read a JSONL training dataset and normalise each row into an `Example`.

Pure standard library on purpose: the API process imports this module to validate an upload before a job
is queued, and it must not pull torch or transformers in to do so.

Every format becomes either a conversation (a tuple of `Message`s with roles system / user / assistant) or a
plain `text`. The first malformed row raises `InvalidDataset` carrying its 1-based line number, so the user
can find it in an editor. Blank lines are skipped (a trailing newline is not an error), but a file with no
rows at all is invalid.

Formats (extra keys in a row are ignored, since exported datasets often carry ids or metadata):
  alpaca    {"instruction": str, "input": str?, "output": str, "system": str?}
  sharegpt  {"conversations": [{"from": "system" | "human" | "gpt", "value": str}, ...]}
  messages  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  text      {"text": str}

Preference formats (objective dpo / orpo) hold a prompt and two completions; each row becomes a
`PreferenceExample`. A prompt is text or a conversation that ends with a user turn; each completion is text, or
a list of assistant messages, as the prompt is:
  preference         {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}  (TRL's)
  openai_preference  {"input": {"messages": messages}, "preferred_output": messages,
                      "non_preferred_output": messages}  (OpenAI's DPO file format)
KTO's unpaired format (objective kto) holds one completion and whether it is desirable; each row becomes a
`LabeledExample`:
  kto                {"prompt": str | messages, "completion": str | messages, "label": bool}  (TRL's)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from domain.errors import DatasetNotFound, DatasetTooLarge, InvalidDataset
from domain.spec import DatasetFormat

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line in the file, for error messages further down the pipeline
    messages: tuple[Message, ...] = ()  # a conversation; empty for the text format
    text: str | None = None  # set for the text format only

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass(frozen=True)
class PreferenceExample:
    line: int
    prompt: tuple[Message, ...] | str  # a conversation ending with a user turn, or text
    chosen: tuple[Message, ...] | str  # assistant messages, or text (the same kind as the prompt)
    rejected: tuple[Message, ...] | str

    @property
    def is_text(self) -> bool:
        return isinstance(self.prompt, str)


@dataclass(frozen=True)
class LabeledExample:
    line: int
    prompt: tuple[Message, ...] | str
    completion: tuple[Message, ...] | str
    label: bool  # True: a desirable completion


AnyExample = Example | PreferenceExample | LabeledExample


def iter_examples(path: str | Path, fmt: DatasetFormat | str) -> Iterator[AnyExample]:
    """Yield one normalised Example per non-blank line; raise InvalidDataset at the first bad one."""
    fmt = DatasetFormat(fmt)
    parse = _PARSERS[fmt]
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFound(f"no dataset file at {path}")
    rows = 0
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            row = _decode_json(raw, line_number)
            if row is None:
                continue
            if not isinstance(row, dict):
                raise InvalidDataset(f"expected a JSON object, got {_type_name(row)}", line=line_number)
            rows += 1
            yield parse(row, line_number)
    if rows == 0:
        raise InvalidDataset("the dataset has no rows")


def validate_dataset(path: str | Path, fmt: DatasetFormat | str, *, max_rows: int | None = None) -> int:
    """Check every row; return the number of rows. Raises InvalidDataset on the first malformed one, and
    DatasetTooLarge past `max_rows` rows."""
    rows = 0
    for _ in iter_examples(path, fmt):
        rows += 1
        if max_rows is not None and rows > max_rows:
            raise DatasetTooLarge(f"the dataset has more than {max_rows} rows", max_rows=max_rows)
    return rows


def _decode_json(raw: bytes, line: int) -> object | None:
    """Parse one JSONL line; None for a blank line."""
    try:
        # utf-8-sig on the first line tolerates the byte-order mark that some editors write.
        text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDataset(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", line=line) from None
    if not text.strip():
        return None
    try:
        value: object = json.loads(text)
        return value
    except json.JSONDecodeError as exc:
        raise InvalidDataset(f"not valid JSON: {exc.msg} (column {exc.colno})", line=line) from None


def _type_name(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


@overload
def _string(
    row: dict[str, object], key: str, line: int, *, required: Literal[True] = True, allow_empty: bool = False
) -> str: ...
@overload
def _string(
    row: dict[str, object], key: str, line: int, *, required: bool, allow_empty: bool = False
) -> str | None: ...
def _string(
    row: dict[str, object], key: str, line: int, *, required: bool = True, allow_empty: bool = False
) -> str | None:
    if key not in row or (row[key] is None and not required):
        if required:
            raise InvalidDataset(f"missing field '{key}'", line=line)
        return None
    value = row[key]
    if not isinstance(value, str):
        raise InvalidDataset(f"field '{key}' must be a string, got {_type_name(value)}", line=line)
    if not allow_empty and not value.strip():
        raise InvalidDataset(f"field '{key}' is empty", line=line)
    return value


def _parse_alpaca(row: dict[str, object], line: int) -> Example:
    instruction = _string(row, "instruction", line)
    extra_input = _string(row, "input", line, required=False, allow_empty=True)
    output = _string(row, "output", line)
    system = _string(row, "system", line, required=False, allow_empty=True)
    prompt = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
    messages = [Message("user", prompt), Message("assistant", output)]
    if system and system.strip():
        messages.insert(0, Message("system", system))
    return Example(line=line, messages=tuple(messages))


def _parse_turns(
    row: dict[str, object], line: int, *, list_key: str, role_key: str, content_key: str, role_names: dict[str, str]
) -> Example:
    if list_key not in row:
        raise InvalidDataset(f"missing field '{list_key}'", line=line)
    turns = row[list_key]
    if not isinstance(turns, list):
        raise InvalidDataset(f"field '{list_key}' must be an array, got {_type_name(turns)}", line=line)
    if not turns:
        raise InvalidDataset(f"field '{list_key}' is an empty conversation", line=line)
    messages = []
    for index, turn in enumerate(turns):
        where = f"{list_key}[{index}]"
        if not isinstance(turn, dict):
            raise InvalidDataset(f"{where} must be an object, got {_type_name(turn)}", line=line)
        for key in (role_key, content_key):
            if key not in turn:
                raise InvalidDataset(f"{where} is missing '{key}'", line=line)
        role, content = turn[role_key], turn[content_key]
        if role not in role_names:
            allowed = ", ".join(repr(name) for name in role_names)
            raise InvalidDataset(f"{where} has unknown {role_key} {role!r} (expected one of {allowed})", line=line)
        if not isinstance(content, str):
            raise InvalidDataset(f"{where}.{content_key} must be a string, got {_type_name(content)}", line=line)
        if role_names[role] == "system" and index != 0:
            raise InvalidDataset(f"{where}: a system message may only come first", line=line)
        messages.append(Message(role_names[role], content))
    if not any(message.role == "assistant" for message in messages):
        raise InvalidDataset("the conversation has no assistant turn to train on", line=line)
    if not any(message.role == "assistant" and message.content.strip() for message in messages):
        raise InvalidDataset("every assistant turn is empty", line=line)
    return Example(line=line, messages=tuple(messages))


def _parse_sharegpt(row: dict[str, object], line: int) -> Example:
    return _parse_turns(
        row, line, list_key="conversations", role_key="from", content_key="value", role_names=SHAREGPT_ROLES
    )


def _parse_messages(row: dict[str, object], line: int) -> Example:
    return _parse_turns(
        row,
        line,
        list_key="messages",
        role_key="role",
        content_key="content",
        role_names={role: role for role in ROLES},
    )


def _parse_text(row: dict[str, object], line: int) -> Example:
    return Example(line=line, text=_string(row, "text", line))


def _parse_preference(row: dict[str, object], line: int) -> PreferenceExample:
    for key in ("prompt", "chosen", "rejected"):
        if key not in row:
            raise InvalidDataset(f"missing field '{key}'", line=line)
    if isinstance(row["prompt"], str):
        prompt: tuple[Message, ...] | str = _string(row, "prompt", line)
        chosen: tuple[Message, ...] | str = _string(row, "chosen", line)
        rejected: tuple[Message, ...] | str = _string(row, "rejected", line)
    elif isinstance(row["prompt"], list):
        prompt = _prompt_messages(row["prompt"], "prompt", line)
        chosen = _completion_messages(row["chosen"], "chosen", line)
        rejected = _completion_messages(row["rejected"], "rejected", line)
    else:
        raise InvalidDataset(
            f"field 'prompt' must be a string or an array of messages, got {_type_name(row['prompt'])}", line=line
        )
    return _pair(line, prompt, chosen, rejected)


def _parse_openai_preference(row: dict[str, object], line: int) -> PreferenceExample:
    for key in ("input", "preferred_output", "non_preferred_output"):
        if key not in row:
            raise InvalidDataset(f"missing field '{key}'", line=line)
    given = row["input"]
    if not isinstance(given, dict) or "messages" not in given:
        raise InvalidDataset("field 'input' must be an object with 'messages'", line=line)
    prompt = _prompt_messages(given["messages"], "input.messages", line)
    chosen = _completion_messages(row["preferred_output"], "preferred_output", line)
    rejected = _completion_messages(row["non_preferred_output"], "non_preferred_output", line)
    return _pair(line, prompt, chosen, rejected)


def _parse_kto(row: dict[str, object], line: int) -> LabeledExample:
    for key in ("prompt", "completion", "label"):
        if key not in row:
            raise InvalidDataset(f"missing field '{key}'", line=line)
    if not isinstance(row["label"], bool):
        raise InvalidDataset(f"field 'label' must be true or false, got {_type_name(row['label'])}", line=line)
    if isinstance(row["prompt"], str):
        prompt: Messages | str = _string(row, "prompt", line)
        completion: Messages | str = _string(row, "completion", line)
    elif isinstance(row["prompt"], list):
        prompt = _prompt_messages(row["prompt"], "prompt", line)
        completion = _completion_messages(row["completion"], "completion", line)
    else:
        raise InvalidDataset(
            f"field 'prompt' must be a string or an array of messages, got {_type_name(row['prompt'])}", line=line
        )
    return LabeledExample(line=line, prompt=prompt, completion=completion, label=row["label"])


Messages = tuple[Message, ...]


def _pair(line: int, prompt: Messages | str, chosen: Messages | str, rejected: Messages | str) -> PreferenceExample:
    if chosen == rejected:
        raise InvalidDataset("the chosen and rejected completions are the same: nothing to prefer", line=line)
    return PreferenceExample(line=line, prompt=prompt, chosen=chosen, rejected=rejected)


def _messages(value: object, where: str, line: int) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidDataset(f"field '{where}' must be a non-empty array of messages", line=line)
    messages = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise InvalidDataset(f"{where}[{index}] must be an object, got {_type_name(turn)}", line=line)
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise InvalidDataset(f"{where}[{index}] has unknown role {role!r} (expected one of {ROLES})", line=line)
        if not isinstance(content, str):
            raise InvalidDataset(f"{where}[{index}].content must be a string, got {_type_name(content)}", line=line)
        if role == "system" and index != 0:
            raise InvalidDataset(f"{where}[{index}]: a system message may only come first", line=line)
        messages.append(Message(role, content))
    return tuple(messages)


def _prompt_messages(value: object, where: str, line: int) -> tuple[Message, ...]:
    messages = _messages(value, where, line)
    if messages[-1].role != "user":
        raise InvalidDataset(f"field '{where}' must end with a user message, not {messages[-1].role}", line=line)
    return messages


def _completion_messages(value: object, where: str, line: int) -> tuple[Message, ...]:
    messages = _messages(value, where, line)
    if any(message.role != "assistant" for message in messages):
        raise InvalidDataset(f"field '{where}' must hold assistant messages only", line=line)
    if not any(message.content.strip() for message in messages):
        raise InvalidDataset(f"field '{where}' is empty", line=line)
    return messages


_PARSERS: dict[DatasetFormat, Callable[[dict[str, object], int], AnyExample]] = {
    DatasetFormat.alpaca: _parse_alpaca,
    DatasetFormat.sharegpt: _parse_sharegpt,
    DatasetFormat.messages: _parse_messages,
    DatasetFormat.text: _parse_text,
    DatasetFormat.preference: _parse_preference,
    DatasetFormat.openai_preference: _parse_openai_preference,
    DatasetFormat.kto: _parse_kto,
}
