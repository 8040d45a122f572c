"""Data files and row schemas -> chat `messages`.

FILE_TYPES says which files hold rows and how they are laid out; `data_files` picks them out of a source.
Each row format is a detector + a converter in FORMATS; a row that cannot be used raises RowError with the
reason, which the dataset stage counts and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_pipeline.errors import DataError

ROLES = ("system", "user", "assistant")

# suffix -> layout: "jsonl" is one row per line, "json" a list of rows or {"data": [...]}.
FILE_TYPES = {".jsonl": "jsonl", ".json": "json"}


def data_files(path: Path) -> list[Path]:
    """The files a local source stands for: itself, or the data files under a directory in sorted order.

    The dataset stage reads exactly these and the source fingerprint hashes exactly these, so a file that
    would not be read (a README beside the data) cannot invalidate a cached dataset.
    """
    if not path.is_dir():
        if path.suffix not in FILE_TYPES:
            raise DataError(f"unsupported file type {path.suffix or '(none)'!r}: {path.name}", field="dataset.data_uri")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_TYPES and p.is_file())
    if not files:
        raise DataError(f"no data file ({', '.join(FILE_TYPES)}) in {path}", field="dataset.data_uri")
    return files


class RowError(ValueError):
    """Why one row was dropped (short, stable text: rows are counted by it)."""


def _from_messages(row: dict) -> list[dict]:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise RowError("messages is not a non-empty list")
    out = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowError("message without role/content")
        if m["role"] not in ROLES:
            raise RowError(f"unknown role {str(m['role'])[:20]!r}")
        if not isinstance(m["content"], str):
            raise RowError("content is not a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# name -> (detector, converter); the first detector that matches wins.
FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], list[dict]]]] = {
    "messages": (lambda row: "messages" in row, _from_messages),
}


def to_messages(row: Any) -> list[dict]:
    """Normalise one row to validated chat messages or raise RowError."""
    if not isinstance(row, dict):
        raise RowError("row is not a JSON object")
    for detect, convert in FORMATS.values():
        if detect(row):
            messages = convert(row)
            break
    else:
        raise RowError(f"unknown row format (expected one of: {', '.join(FORMATS)})")
    check_turns(messages)
    return messages


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
