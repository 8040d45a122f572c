"""`lora-pipeline run|demo|dataset|train|eval|register`: flags and YAML both fill the one config.

Only the config module is imported at start-up; torch, transformers and lm-eval load inside the stages,
so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from lora_pipeline import __version__
from lora_pipeline.config import SECTIONS, Config, field_type, fields_of, from_dict, load_yaml, validate
from lora_pipeline.errors import ConfigError, LoraPipelineError

STAGE_COMMANDS = {
    "dataset": "Fetch, read, validate and split the dataset into RUN_DIR/dataset",
    "train": "LoRA fine-tune on RUN_DIR/dataset into RUN_DIR/train (adapter, metrics, loss chart)",
    "eval": "lm-eval the base model and base+adapter from RUN_DIR/train into RUN_DIR/eval",
    "register": "Register RUN_DIR/train's adapter in the model registry (skipped when no address)",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2) instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"lora-pipeline: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lora-pipeline",
        description="LoRA fine-tuning pipeline: dataset -> train -> eval -> register.",
        epilog="Run `lora-pipeline demo` for the built-in offline demo, `lora-pipeline run --help` for all options.",
    )
    parser.add_argument("--version", action="version", version=f"lora-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands = {
        "run": "Run all four stages into one run directory",
        "demo": "Run the built-in demo: tiny local model, demo dataset, offline, CPU",
        **STAGE_COMMANDS,
    }
    for name, help_text in commands.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            usage=f"lora-pipeline {name} [-c YAML] [-o RUN_DIR] [--SECTION.OPTION VALUE ...]",
        )
        _add_common(p, demo=name in ("run", "demo"))
        _add_config_flags(p)
    return parser


def _add_common(p: argparse.ArgumentParser, demo: bool) -> None:
    g = p.add_argument_group("run")
    g.add_argument("-c", "--config", action="append", default=[], metavar="YAML", help="YAML config file (repeatable)")
    g.add_argument(
        "-o",
        "--run_dir",
        default=None,
        metavar="DIR",
        help="Run directory holding each stage's output (default: runs/<timestamp>, or runs/demo for the demo)",
    )
    g.add_argument("--force", action="store_true", help="Rerun stages even when their cached output matches")
    g.add_argument("--print_config", action="store_true", help="Print the resolved config as YAML and exit")
    if demo:
        g.add_argument("--demo", action="store_true", help="Use the built-in demo model, dataset and eval task")


def _flag_help(f: dataclasses.Field) -> str:
    meta = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    names = [f"KFP: {meta['kfp']}"] if "kfp" in meta else []
    if "component" in meta:
        names.append(f"component: {meta['component']}")
    spec = f" [{'; '.join(names)}]" if names else ""
    return f"{meta['help']} (default: {default!r}){spec}".replace("%", "%%")


def _metavar(section: str, name: str) -> str:
    text = str(field_type(section, name))
    for word in ("bool", "int", "float", "list", "dict"):
        if word in text:
            return word.upper()
    return "STR"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for section in SECTIONS:
        group = p.add_argument_group(f"{section} options")
        for f in fields_of(section):
            group.add_argument(
                f"--{section}.{f.name}",
                dest=f"cfg:{section}.{f.name}",
                metavar=_metavar(section, f.name),
                nargs="?",
                const="true",  # a bare boolean flag (`--train.save_epoch`) means true
                default=argparse.SUPPRESS,
                help=_flag_help(f),
            )


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    """defaults <- `base` (the demo's) <- YAML files in order <- CLI flags; then validated."""
    config = from_dict(base or {})
    for path in args.config:
        config = from_dict(load_yaml(path), config)
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            section, name = key[4:].split(".", 1)
            flags.setdefault(section, {})[name] = value
    return validate(from_dict(flags, config))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except LoraPipelineError as exc:
        sys.stderr.write(f"lora-pipeline: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("lora-pipeline: interrupted\n")
        return 130


def _setup_logging() -> None:
    import logging

    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("lora_pipeline").setLevel(logging.INFO)


def _dispatch(args: argparse.Namespace) -> int:
    _setup_logging()
    demo = args.command == "demo" or getattr(args, "demo", False)
    base = None
    if demo:
        from lora_pipeline.pipeline import demo_config

        base = demo_config()
    config = resolve_config(args, base)
    if args.print_config:
        from lora_pipeline.config import dump_yaml

        sys.stdout.write(dump_yaml(config))
        return 0

    from lora_pipeline import pipeline

    run_dir = Path(args.run_dir) if args.run_dir else pipeline.default_run_dir(demo)
    stages = pipeline.STAGES if args.command in ("run", "demo") else (args.command,)
    if "dataset" in stages and not config.dataset.data_uri:
        raise ConfigError("required: a dataset location (or use `lora-pipeline demo`)", field="dataset.data_uri")
    manifest = pipeline.run(config, run_dir, stages=stages, force=args.force)
    pipeline.print_summary(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
