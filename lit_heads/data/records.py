"""The `Example` type and the record formats that turn raw data set rows into examples.

A record is one dict as read from a file or the hub. Its format is detected from its keys (or forced
with `format=`), and it becomes an `Example`: what the model sees before the response, the response
it is trained to produce, and (when known) the answer a checker compares a generation with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lit_heads.errors import DataError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Example:
    """One SFT sample.

    prompt: a string (rendered as a single user turn) or the chat messages that precede the response.
    response: the text the model is trained to produce (loss is computed on it only).
    answer: what a checker compares a generation with (GSM8K's final number, a task's exact answer);
        None when the data set gives none.
    task: selects the checker in `tasks.is_correct` ("custom" when none applies).
    source: where the sample came from (`file:line`, `generated:arithmetic#3`), for error messages;
        not part of equality so the same sample read from two places compares equal.
    """

    prompt: str | Messages
    response: str
    answer: str | None = None
    task: str = "custom"
    source: str | None = field(default=None, compare=False)


# Checked in this order by auto-detection; the first whose required keys are all present wins.
# The chat formats go first because chat exports often carry a stray "prompt" or "question" column too.
FORMATS: dict[str, str] = {
    "messages": "messages (a list of {role, content}; the last assistant message is the response)",
    "sharegpt": "conversations (a list of {from: human|gpt|system, value}; the last gpt turn is the response)",
    "alpaca": "instruction, output (and optional input)",
    "prompt_response": "prompt, response (or completion)",
    "question_answer": "question, answer (GSM8K style: the final '#### N' line is the answer)",
}
# The keys each format needs (alternatives in one tuple), in detection order.
_REQUIRED: dict[str, list[tuple[str, ...]]] = {
    "messages": [("messages",)],
    "sharegpt": [("conversations",)],
    "alpaca": [("instruction",), ("output",)],
    "prompt_response": [("prompt",), ("response", "completion")],
    "question_answer": [("question",), ("answer",)],
}
# ShareGPT speaker names -> chat-template roles.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _format_list() -> str:
    return "; ".join(f"'{name}': {keys}" for name, keys in FORMATS.items())


def _missing_keys(record: dict[str, Any], fmt: str) -> list[str]:
    return [" or ".join(alts) for alts in _REQUIRED[fmt] if not any(k in record for k in alts)]


def detect_format(record: dict[str, Any], where: str = "a record") -> str:
    """Name of the format whose keys `record` has, or DataError listing the formats and the keys seen."""
    for fmt in FORMATS:
        if not _missing_keys(record, fmt):
            return fmt
    raise DataError(
        f"{where}: cannot tell the record format from its keys {sorted(record)}. Known formats and the keys "
        f"they need: {_format_list()}. Rename the columns to one of these, or pass format= explicitly."
    )


def check_format_name(fmt: str) -> str:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"Unknown data format '{fmt}'. Use 'auto' or one of: {_format_list()}.")
    return fmt


_GSM8K_MARKER = "#### "


def parse_gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K solution: the text after its last '#### ', commas removed
    ('#### 1,000' -> '1000'). None when the text has no such line."""
    if _GSM8K_MARKER not in text:
        return None
    return text.rsplit(_GSM8K_MARKER, 1)[1].strip().replace(",", "")


def _field(record: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise DataError(
            f"{where}: field '{key}' must be a string, but it is {type(value).__name__} ({short_repr(value)}). "
            f"Fix that record so '{key}' holds text."
        )
    return value


def _answer_field(record: dict, key: str, where: str, *, optional: bool = True) -> str | None:
    # Numeric answers are common in hand-made QA files ({"answer": 42}); text is the canonical form.
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _field(record, key, where, optional=optional)


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _messages(value: Any, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} dicts, but it is "
            f"{short_repr(value)}."
        )
    for i, message in enumerate(value):
        if not (isinstance(message, dict) and isinstance(message.get("role"),
                                                         str) and isinstance(message.get("content"), str)):
            raise DataError(
                f"{where}: message {i} must be a dict with string 'role' and 'content', but it is "
                f"{short_repr(message)}."
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _sharegpt(value: Any, where: str) -> Messages:
    """ShareGPT turns ({from: human|gpt|system, value}) as chat messages ({role: user|assistant|system, content})."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{where}: 'conversations' must be a non-empty list of {{'from': ..., 'value': ...}} dicts, but it is "
            f"{short_repr(value)}."
        )
    messages = []
    for i, turn in enumerate(value):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in _SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise DataError(
                f"{where}: conversation turn {i} must be a dict with 'from' one of {sorted(_SHAREGPT_ROLES)} and a "
                f"string 'value', but it is {short_repr(turn)}."
            )
        messages.append({"role": _SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


def record_to_example(record: Any, fmt: str = "auto", where: str = "a record") -> Example:
    """Convert one raw record to an `Example`. `where` (e.g. 'train.jsonl:12') is put in every error.

    Besides its format's keys a record may carry 'answer' and 'task' (so generated tasks written to a
    file keep their checker when read back).
    """
    example = _record_to_example(record, fmt, where)
    if not example.response.strip():
        # An empty response has no token to learn from: the loss would be 0/0 for this example.
        raise DataError(f"{where}: the response is empty, so there is nothing to train on. Fill it in or drop the "
                        "record.")
    return example


def _record_to_example(record: Any, fmt: str, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (a dict of fields), got {type(record).__name__} "
                        f"({short_repr(record)}).")
    if fmt == "auto":
        fmt = detect_format(record, where)
    else:
        check_format_name(fmt)
        missing = _missing_keys(record, fmt)
        if missing:
            raise DataError(
                f"{where}: format '{fmt}' was requested but the record lacks {missing}; its keys are "
                f"{sorted(record)}. Known formats: {_format_list()}."
            )

    if fmt == "question_answer":
        # The answer text is the response; GSM8K's '#### N' gives the checkable answer.
        response = _answer_field(record, "answer", where, optional=False)
        final = parse_gsm8k_answer(response)
        task = _field(record, "task", where, optional=True)
        if final is not None:
            return Example(_field(record, "question", where), response, final, task or "gsm8k", where)
        return Example(_field(record, "question", where), response, response.strip(), task or "custom", where)

    prompt, response = _prompt_and_response(record, fmt, where)
    answer = _answer_field(record, "answer", where)
    task = _field(record, "task", where, optional=True)
    final = _final_gsm8k_line(response) if answer is None else None
    if final is not None:
        return Example(prompt, response, final, task or "gsm8k", where)
    return Example(prompt, response, answer, task or "custom", where)


def _final_gsm8k_line(response: str) -> str | None:
    """N when the response ends in GSM8K's '#### N' line (the same parse as question/answer records)."""
    final = parse_gsm8k_answer(response)
    return final if final and "\n" not in final else None


def _prompt_and_response(record: dict, fmt: str, where: str) -> tuple[str | Messages, str]:
    if fmt in ("messages", "sharegpt"):
        messages = _messages(record["messages"], where) if fmt == "messages" else _sharegpt(record["conversations"],
                                                                                            where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(
                f"{where}: '{_REQUIRED[fmt][0][0]}' needs at least one message before an assistant message (the "
                f"response); roles seen: {[m['role'] for m in messages]}."
            )
        return messages[:last], messages[last]["content"]

    if fmt == "alpaca":
        instruction = _field(record, "instruction", where)
        extra = _field(record, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return prompt, _field(record, "output", where)

    # prompt_response
    prompt = record["prompt"]
    prompt = _messages(prompt, where) if isinstance(prompt, list) else _field(record, "prompt", where)
    return prompt, _field(record, "response" if "response" in record else "completion", where)


def example_to_record(example: Example) -> dict[str, Any]:
    """The `prompt_response` record for an example (what `record_to_example` reads back unchanged)."""
    record: dict[str, Any] = {"prompt": example.prompt, "response": example.response, "task": example.task}
    if example.answer is not None:
        record["answer"] = example.answer
    return record


_NUMBER = re.compile(r"(?<!\w)-?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_final_number(text: str) -> str | None:
    """The last number written in `text`, commas removed ('... so $1,250.' -> '1250'); None if none.

    Digits glued to letters (the 1 in 'x1') are not numbers here, so a program's variable names do not
    count; a '-' right after a digit is subtraction, not a sign ('3-4' gives '3' and '4').
    """
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None
