"""docs/options.md, generated from the schema so the reference cannot drift from the code:
`python -m lora_pipeline.options_reference > docs/options.md` (a test fails when the file is out of date)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from lora_pipeline.cli_options import flag_name
from lora_pipeline.config.schema import HELP_GROUPS, fields_of, option_group

REGENERATE = "python -m lora_pipeline.options_reference > docs/options.md"

INTRO = f"""\
# Options reference

<!-- Generated from src/lora_pipeline/config/schema.py by `{REGENERATE}`: edit the schema, not this file. -->

Every option of the one config, by section, as `lora-pipeline run --help` groups them. An option is set
in a YAML file (`-c run.yaml`) under its section (`train: {{lora_r: 32}}`), or by its flag
(`--train.lora_r 32`), which wins over the YAML. The KFP pipeline parameter is the option's name in a
compiled pipeline (`lora-pipeline compile`), and the component input its name in the spec's training
component; options with neither are this project's additions, fixed at compile time from `-c`/flags.
Defaults are shown as YAML/JSON values.
"""

HEADER = "| option | flag | type | default | KFP pipeline parameter | component input | description |"
RULE = "|---|---|---|---|---|---|---|"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`" if text else ""


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _row(section: str, f: dataclasses.Field) -> str:
    meta = f.metadata
    description = meta["help"]
    if "choices" in meta:
        description += " (one of: " + ", ".join(str(c) for c in meta["choices"]) + ")"
    cells = [
        _code(f"{section}.{f.name}"),
        _code(flag_name(section, f)),
        _code(str(f.type)),
        _code(json.dumps(_default(f))),
        _code(meta.get("kfp", "")),
        _code(meta.get("component", "")),
        _cell(description),
    ]
    return "| " + " | ".join(cells) + " |"


def options_markdown() -> str:
    """The whole reference: one table per `--help` group, every option of every section in schema order."""
    parts = [INTRO]
    for group, (section, title) in HELP_GROUPS.items():
        rows = [_row(section, f) for f in fields_of(section) if option_group(section, f) == group]
        parts.append(f"## {title}\n\n{HEADER}\n{RULE}\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(options_markdown(), end="")
