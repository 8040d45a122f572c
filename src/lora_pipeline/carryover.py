"""What a command continuing a run directory takes over from its record (run.json), said in one line.

A run directory starts from the config recorded in it, so an option given once keeps applying to later
commands on that directory. The options that differ from what the command would start from without the
record (the defaults, or the shipped demo for a demo run) are named; `--fresh` drops them, and the demo
never takes them (a plain `demo` is always the demo as shipped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_pipeline.config import SECTIONS, Config, fields_of, from_dict
from lora_pipeline.files import read_json
from lora_pipeline.redaction import scrub


def carried_over(recorded: dict[str, Any], fresh: Config, given: set[str]) -> dict[str, Any]:
    """`section.option` -> recorded value, for each recorded option that differs from `fresh` and that
    this command does not set itself (`given`). Secrets are never recorded, so never carried over."""
    was, now = from_dict(recorded).to_dict(), fresh.to_dict()
    out: dict[str, Any] = {}
    for section in SECTIONS:
        for f in fields_of(section):
            key = f"{section}.{f.name}"
            if not f.metadata.get("secret") and key not in given and was[section][f.name] != now[section][f.name]:
                out[key] = was[section][f.name]
    return out


def given_options(layers: list[dict[str, Any]]) -> set[str]:
    """`section.option` for every option the command's YAML files and flags set."""
    return {
        f"{section}.{name}"
        for layer in layers
        for section, values in layer.items()
        if isinstance(values, dict)
        for name in values
    }


def was_demo(run_dir: Path) -> bool:
    """Whether the run directory was made by the demo (`demo`, or `run --demo`): its base is the demo's."""
    try:
        invocations = read_json(Path(run_dir) / "run.json").get("invocations", [])
        return any(inv.get("command") == "demo" or inv.get("demo") for inv in invocations)
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):  # a bad record is named when read
        return False


def describe(options: dict[str, Any]) -> str:
    """`train.epochs=3, eval.tasks=["a", "b"]`: strings as they are, other values as JSON. The line stays one
    line: a string with a line break or another control character is shown as JSON (escaped), and a long
    value is cut."""
    return ", ".join(f"{key}={_shown(value)}" for key, value in options.items())


def _shown(value: Any, most: int = 80) -> str:
    text = value if isinstance(value, str) and value.isprintable() else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= most else text[: most - 3] + "..."


def carry_over_line(run_dir: Path, carried: dict[str, Any], demo: bool, fresh: bool) -> str | None:
    """The one line a continued run prints about the recorded options (None when there are none)."""
    if not carried:
        return None
    where, names = Path(run_dir) / "run.json", scrub(describe(carried))
    if demo:
        return f"not carried over from {where}: {names} (the demo runs as shipped: give them again to keep them)"
    if fresh:
        return f"--fresh: not carried over from {where}: {names}"
    return f"carried over from {where}: {names} (--fresh drops them)"
