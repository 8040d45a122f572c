"""Row schemas -> the rows the train stage reads.

A source's rows come in one of the FORMATS below; `detect` picks it from a row's columns (once per file, so
a row that lacks a field is reported as such instead of as "unknown format"), and `normalise` turns each row
into one of two shapes:
  {"messages": [{"role", "content"}, ...]}   chat: loss on the assistant turns only
  {"text": "..."}                            plain text: loss on every token, no chat template
A row that cannot be used raises RowError with a short, stable reason, which the dataset stage counts.

`columns` (dataset.columns) maps a format's field names to a source's own column names, e.g.
{"instruction": "question", "output": "answer"}, so unknown layouts need no code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")

# format -> (required fields, optional fields); `detect` tries them in this order.
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),  # OpenAI chat
    "sharegpt": (("conversations",), ()),  # [{"from": "human"|"gpt"|"system", "value": ...}]
    "alpaca": (("instruction", "output"), ("input", "system")),
    "prompt_completion": (("prompt", "completion"), ()),  # strings or message lists
    "text": (("text",), ()),  # plain text, loss on all tokens
}

# ShareGPT speaker names -> chat roles (the names found in the common ShareGPT dumps).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


class RowError(ValueError):
    """Why one row was dropped (short, stable text: rows are counted by it)."""


def describe_formats() -> str:
    """'messages (messages), alpaca (instruction, output[, input, system]), ...' for error messages."""
    parts = []
    for name, (required, optional) in FORMATS.items():
        extra = f"[, {', '.join(optional)}]" if optional else ""
        parts.append(f"{name} ({', '.join(required)}{extra})")
    return ", ".join(parts)


def detect(columns: Iterable[str], mapping: Mapping[str, str] | None = None) -> str | None:
    """The first format whose required fields are all present (through `mapping`), else None."""
    present = set(columns)
    mapping = mapping or {}
    for name, (required, _) in FORMATS.items():
        if all(mapping.get(f, f) in present for f in required):
            return name
    return None


def filled(row: dict) -> list[str]:
    """The columns of a row that hold a value: a null column (Parquet and Arrow files of several layouts share one
    schema) or an empty one (CSV writes a missing value so) says nothing about the row's format."""
    return [k for k, v in row.items() if v is not None and v != ""]


def normalise(row: Any, fmt: str, mapping: Mapping[str, str] | None = None) -> dict:
    """One source row -> {"messages": [...]} or {"text": ...}, or RowError."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    get = _Getter(row, mapping or {})
    if fmt == "text":
        text = get.string("text")
        if not text.strip():
            raise RowError("empty text")
        return {"text": text}
    if fmt == "messages":
        messages = _message_list(get.required("messages"), "messages")
    elif fmt == "sharegpt":
        messages = _message_list(get.required("conversations"), "conversations")
    elif fmt == "alpaca":
        instruction, extra = get.string("instruction"), get.string("input", optional=True)
        system = get.string("system", optional=True)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [
            {"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
            {"role": "assistant", "content": get.string("output")},
        ]
    elif fmt == "prompt_completion":
        messages = _part(get.required("prompt"), "user", "prompt") + _part(
            get.required("completion"), "assistant", "completion"
        )
    else:
        raise ValueError(f"unknown format {fmt!r}")  # validated with the config: a bug if reached
    check_turns(messages)
    return {"messages": messages}


class _Getter:
    """Field access through the column mapping; reasons name the source's own column."""

    def __init__(self, row: dict, mapping: Mapping[str, str]) -> None:
        self.row, self.mapping = row, mapping

    def required(self, name: str) -> Any:
        column = self.mapping.get(name, name)
        value = self.row.get(column)
        if value is None:
            raise RowError(f"missing field {column!r}")
        return value

    def string(self, name: str, optional: bool = False) -> str:
        column = self.mapping.get(name, name)
        value = self.row.get(column)
        if value is None:
            if optional:
                return ""
            raise RowError(f"missing field {column!r}")
        if not isinstance(value, str):
            raise RowError(f"{column} is not a string")
        return value


def _part(value: Any, role: str, name: str) -> list[dict]:
    """A prompt or completion: a string (one turn of `role`) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _message_list(value, name)


def _message_list(value: Any, name: str) -> list[dict]:
    # Tabular files (CSV) carry lists as JSON text.
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"{name} is not valid JSON") from None
        except (ValueError, RecursionError):  # a 5,000-digit number, or nesting past the recursion limit
            raise RowError(f"{name} is not JSON that can be read") from None
    if not isinstance(value, list) or not value:
        raise RowError(f"{name} is not a non-empty list")
    return [_message(m) for m in value]


def _message(m: Any) -> dict:
    """{"role", "content"} (OpenAI) or {"from", "value"} (ShareGPT) -> {"role", "content"}."""
    if not isinstance(m, dict):
        raise RowError("message without role/content")
    if m.get("role") is not None:
        role, content = m["role"], m.get("content")
    elif m.get("from") is not None:
        role, content = SHAREGPT_ROLES.get(str(m["from"]).strip().lower(), m["from"]), m.get("value")
    else:
        raise RowError("message without role/content")
    if isinstance(role, str):  # "User", "ASSISTANT ": the same roles, as ShareGPT's speaker names are read
        role = role.strip().lower()
    if role not in ROLES:
        raise RowError(f"unknown role {str(role)[:20]!r}")
    return {"role": role, "content": _content(content)}


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    # OpenAI content parts: text parts only (an image part has no place in a text model's data).
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    if content is None:
        raise RowError("message without role/content")
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        raise RowError("content has a part that is not text (an image, audio, a file)")
    raise RowError("content is not a string")


def check_turns(messages: list[dict]) -> None:
    """System first (optional), then user/assistant alternating, ending on a non-empty assistant turn."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise RowError("no user/assistant turns")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowError("roles out of order")
    if turns[-1]["role"] != "assistant":
        raise RowError("last turn is not the assistant's")
    if any(not m["content"].strip() for m in turns if m["role"] == "assistant"):
        raise RowError("empty assistant turn")
