"""The `--SECTION.OPTION` flags, generated from the config schema: help grouped by the schema's
`option_group`, the spec's KFP names in a table of their own (`--help-kfp`), and one-line errors for a
mistyped flag or a flag without its value."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import re
import sys
import textwrap
from collections.abc import Iterable
from typing import Any

from lora_pipeline.config import SECTIONS, field_type, fields_of
from lora_pipeline.config.schema import HELP_GROUPS, option_group
from lora_pipeline.errors import ConfigError


class BuiltIn:
    """A default the demo brings itself (its model, data, eval task), shown as such in `demo --help`."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return self.what


OTHER_SECTIONS = (
    "The other stages' options (--dataset.*, --train.*, --eval.*, --registry.*) are accepted too: "
    "`lora-pipeline run --help` lists them all."
)


class CompactHelp(argparse.HelpFormatter):
    """Each option's help right after the flag, wrapped at the full width with a hanging indent: the long
    `--section.option TYPE` names would otherwise push every help onto lines of its own, in a narrow column."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.option_strings or not action.help or action.help == argparse.SUPPRESS:
            return super()._format_action(action)
        text = f"{self._format_action_invocation(action)}  {self._expand_help(action)}"
        indent = " " * self._current_indent
        width = max(self._width, 40)
        lines = textwrap.wrap(
            text, width, initial_indent=indent, subsequent_indent=indent + "    ", break_on_hyphens=False
        )
        return "\n".join(lines) + "\n"


def demo_defaults() -> dict[str, dict[str, Any]]:
    """The defaults `demo --help` shows: the demo's own settings (static: building the assets waits for a run)."""
    from lora_pipeline.demo import DEMO_OVERRIDES

    builtin = {
        "dataset": {"data_uri": BuiltIn("the demo's data")},
        "train": {"model": BuiltIn("the demo's tiny model")},
        "eval": {"tasks": BuiltIn("the demo's task"), "include_path": BuiltIn("the demo's task folder")},
        "registry": {"address": "local", "model_name": "demo-topic"},
    }
    return {s: {**builtin.get(s, {}), **DEMO_OVERRIDES.get(s, {})} for s in builtin}


def add_config_flags(
    p: argparse.ArgumentParser,
    sections: Iterable[str] | None = None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Every config option as a flag. The help shows the options of `sections` (None: all), grouped; the
    others are accepted as well but left out of this help. `defaults` overrides the defaults shown."""
    shown = set(SECTIONS if sections is None else sections)
    groups = {key: p.add_argument_group(title) for key, (sec, title) in HELP_GROUPS.items() if sec in shown}
    for section in SECTIONS:
        for f in fields_of(section):
            group = groups.get(option_group(section, f))
            # A bare boolean flag (`--train.save_epoch`) means true; any other flag needs its value.
            arity = {"nargs": "?", "const": "true"} if _is_bool(section, f.name) else {}
            if "flag" in f.metadata:  # a repeatable flag, one list item each (`--dataset.source URI[@WEIGHT]`)
                arity = {"action": "append"}
            (group or p).add_argument(
                flag_name(section, f),
                dest=f"cfg:{section}.{f.name}",
                metavar=f.metadata.get("metavar") or _metavar(section, f.name),
                default=argparse.SUPPRESS,
                help=_flag_help(section, f, defaults or {}) if group else argparse.SUPPRESS,
                **arity,
            )


def flag_name(section: str, f: dataclasses.Field) -> str:
    """`--section.option`; a list given one item per flag is named for its item (`--dataset.source`)."""
    return f"--{section}.{f.metadata.get('flag', f.name)}"


def _flag_help(section: str, f: dataclasses.Field, defaults: dict[str, dict[str, Any]]) -> str:
    text = re.sub(r"^\[Q?LoRA\] ", "", f.metadata["help"])  # the group's title says it
    if f.name in defaults.get(section, {}):
        default = defaults[section][f.name]
        text = text.removeprefix("[REQUIRED] ")  # the demo brings its own
    else:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return f"{text} (default: {default!r})".replace("%", "%%")


def _is_bool(section: str, name: str) -> bool:
    return _metavar(section, name) == "BOOL"


@functools.cache  # typing.get_type_hints compiles the annotations: once per option, not once per command
def _metavar(section: str, name: str) -> str:
    text = str(field_type(section, name))
    for word in ("bool", "int", "float", "list", "dict"):
        if word in text:
            return word.upper()
    return "STR"


def kfp_table(sections: Iterable[str] | None = None) -> str:
    """option | KFP pipeline parameter | component input: the spec's names of each option that has one."""
    rows = [("option", "KFP pipeline parameter", "component input")]
    for section in SECTIONS if sections is None else sections:
        for f in fields_of(section):
            meta = f.metadata
            if "kfp" in meta or "component" in meta:
                rows.append((f"--{section}.{f.name}", meta.get("kfp", "-"), meta.get("component", "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows) + "\n"


class KfpHelp(argparse.Action):
    """`--help-kfp`: the table of spec names, then exit (as --help does)."""

    def __init__(self, option_strings: list[str], dest: str, sections: Iterable[str] | None = None, **kw: Any):
        self.sections = None if sections is None else tuple(sections)
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        parser._print_message(kfp_table(self.sections), sys.stdout)
        parser.exit()


class Once(argparse.Action):
    """A flag naming one thing to do (`--gguf TYPE`, `--prompt TEXT`): given twice with different values,
    argparse would keep the last and drop the other without a word; this refuses it in one line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.given: dict[int, Any] = {}  # id(namespace) -> the value given (the namespace itself stays clean)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        before = self.given.get(id(namespace), values)
        if before != values:
            parser.error(f"{option_string} given twice ({before!r}, then {values!r}): give it once")
        self.given[id(namespace)] = values
        setattr(namespace, self.dest, values)


def unknown_arguments(extras: list[str], parser: argparse.ArgumentParser) -> str:
    """The error for arguments the command does not take, with the closest flag it does take."""
    flag = next((a for a in extras if a.startswith("-")), None)
    if flag is None:
        return f"unrecognized arguments: {' '.join(extras)}"
    name = flag.split("=", 1)[0]
    known = sorted({s for action in parser._actions for s in action.option_strings if s.startswith("--")})
    match = difflib.get_close_matches(name, known, n=1)
    return f"unknown option {name}" + (f" (did you mean {match[0]}?)" if match else "")


_NO_VALUE = re.compile(r"argument (\S+): expected one argument")
_BAD_CHOICE = re.compile(r"argument \S+: invalid choice: '(.*)' \(choose from (.*)\)$")


def readable_error(message: str) -> str:
    """argparse's message, with a flag given without its value said as such, and the closest choice named
    for a mistyped command or choice."""
    missing = _NO_VALUE.match(message)
    if missing:
        return f"{missing.group(1).split('/')[-1]} needs a value"
    choice = _BAD_CHOICE.match(message)
    if choice:
        match = difflib.get_close_matches(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)), n=1)
        return message + (f"; did you mean {match[0]}?" if match else "")
    return message


def command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of a subcommand (the top-level one when there is none), to suggest its own flags."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


_PATH_METAVARS = frozenset({"DIR", "FILE", "YAML", "RUN", "NAME=DIR"})


def check_path_arguments(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Every path flag of the command: an empty one would be read as not given (`-o ""` ran the whole demo into
    the default run directory), and a NUL byte is in no file name (the OS call raises ValueError mid-run)."""
    for action in parser._actions:
        if action.metavar not in _PATH_METAVARS:
            continue
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and (not value or "\0" in value):
                raise ConfigError(f"not a path: {value!r}", field="/".join(action.option_strings))
