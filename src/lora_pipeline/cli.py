"""`lora-pipeline run|demo|<stage>`: flags and YAML both fill the one config; stages come from the stage table.

At start-up only the light modules load (config and YAML, the stage table, pre-flight, logging); torch,
transformers, datasets and lm-eval load inside the stages, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

from lora_pipeline import __version__
from lora_pipeline import stages as table
from lora_pipeline.carryover import carried_over, carry_over_line, given_options, was_demo
from lora_pipeline.cli_options import (
    OTHER_SECTIONS,
    CompactHelp,
    KfpHelp,
    add_config_flags,
    check_path_arguments,
    command_parser,
    demo_defaults,
    readable_error,
    unknown_arguments,
)
from lora_pipeline.config import Config, dump_yaml, from_dict, load_yaml, restore_secrets, validate
from lora_pipeline.errors import USER_ERRNOS, ConfigError, LoraPipelineError, describe_os_error, one_line
from lora_pipeline.files import exclusive_lock
from lora_pipeline.logs import apply_verbosity, setup_logging
from lora_pipeline.preflight import preflight
from lora_pipeline.redaction import redact_config, remember_config, scrub, scrub_argv
from lora_pipeline.registry import remember_secret
from lora_pipeline.registry.commands import add_models_command, models_command
from lora_pipeline.reports.summary import print_stage_summary, print_summary
from lora_pipeline.stages import Stage
from lora_pipeline.tool_commands import TOOL_COMMANDS, add_tool_commands, own_data, preview_color


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2) instead of usage + message, and takes no
    abbreviations: `--train.epoch` is a mistake to point out, not a prefix of `--train.epochs`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", CompactHelp)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"lora-pipeline: error: {readable_error(message)}\n")
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
        **{s.name: s.help for s in table.STAGES},
    }
    for name, help_text in commands.items():
        stage = table.BY_NAME.get(name)
        usage = f"lora-pipeline {name} [-c YAML] [-o RUN_DIR] [--SECTION.OPTION VALUE ...]"
        if stage:
            inputs = "".join(f" --input {up}=DIR" for up in stage.upstream)
            usage += f"\n       lora-pipeline {name} [-c YAML]{inputs} --out DIR [--SECTION.OPTION VALUE ...]"
        shown = (stage.section,) if stage else None
        epilog = OTHER_SECTIONS if stage else None
        description = help_text + (_DEMO_SETS if name == "demo" else "")
        p = sub.add_parser(name, help=help_text, description=description, usage=usage, epilog=epilog)
        _add_common(p, demo=name in ("run", "demo"), fresh=name != "demo", kfp_sections=shown)
        if stage:
            _add_stage_io(p, stage)
        add_config_flags(p, shown, demo_defaults() if name == "demo" else None)
    from lora_pipeline.kubeflow.command import add_compile_command  # argparse only; kfp loads when it runs

    add_compile_command(sub, add_config_flags)
    sub.choices["compile"].add_argument("--help-kfp", action=KfpHelp, help=_KFP_HELP)
    add_models_command(sub, _Parser)
    from lora_pipeline.export_command import add_export_command

    add_export_command(sub)
    add_tool_commands(sub, add_config_flags)
    return parser


_DEMO_SETS = ". It sets the model, data, eval task and local registry itself; options override them"
_KFP_HELP = "List the options' KFP pipeline parameter and component input names, then exit"


def _add_common(p: argparse.ArgumentParser, demo: bool, fresh: bool, kfp_sections: tuple[str, ...] | None) -> None:
    g = p.add_argument_group("run")
    g.add_argument("-c", "--config", action="append", default=[], metavar="YAML", help="YAML config file (repeatable)")
    g.add_argument(
        "-o",
        "--run_dir",
        default=None,
        metavar="DIR",
        help="Run directory holding each stage's output (default: runs/<timestamp>, or runs/demo for the demo). "
        "An existing run directory starts from the config recorded in it (one line names what it carries over); "
        "-c and flags override it",
    )
    g.add_argument("--force", action="store_true", help="Rerun stages even when their cached output matches")
    g.add_argument("--print_config", action="store_true", help="Print the resolved config as YAML and exit")
    if fresh:
        g.add_argument(
            "--fresh",
            action="store_true",
            help="With an existing run directory: start from the defaults (a demo run's: the demo's), not from the "
            "options recorded in it; stage outputs are still reused by their cache keys",
        )
    if demo:
        g.add_argument("--demo", action="store_true", help="Use the built-in demo model, dataset and eval task")
    g.add_argument("--help-kfp", action=KfpHelp, sections=kfp_sections, help=_KFP_HELP)


def _add_stage_io(p: argparse.ArgumentParser, stage: Stage) -> None:
    g = p.add_argument_group("stage inputs and output, instead of a run directory")
    if stage.upstream:
        g.add_argument(
            "--input",
            action="append",
            default=[],
            metavar="NAME=DIR",
            help=f"Output directory of an upstream stage ({', '.join(stage.upstream)})",
        )
    g.add_argument("--out", default=None, metavar="DIR", help="Write this stage's output here (no run.json, no cache)")


def config_layers(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The YAML files' layers in order, and the flags given on the command line (section -> option -> value)."""
    layers = [load_yaml(path) for path in args.config]
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            section, name = key[4:].split(".", 1)
            flags.setdefault(section, {})[name] = value
    return layers, flags


def resolve_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> Config:
    """defaults <- `base` (the demo's, or the config recorded in the run directory) <- YAML files <- flags."""
    config = from_dict(base or {})
    layers, flags = config_layers(args)
    for layer in layers:
        config = from_dict(layer, config)
    config = validate(from_dict(flags, config))
    remember_secret(config.registry)  # a token given as an option is scrubbed like one from the environment
    remember_config(config.to_dict())  # URI credentials, env_vars and model_args values: scrubbed from all text
    scrub_argv()
    return config


def _negative_values(argv: list[str]) -> list[str]:
    """`--train.learning_rate -1e-4`: argparse reads -1e-4 as a flag; joined as `--opt=-1e-4` it is a value."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "." in out[-1] and "=" not in out[-1] and _NEGATIVE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


_NEGATIVE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if extras:
        parser.error(unknown_arguments(extras, command_parser(parser, args.command)))
    if not args.command:
        parser.print_help()
        return 0
    previous_umask = os.umask(0o077)  # run records, checkpoints and adapters are private (0600/0700)
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)  # a pod eviction is an interruption
    try:
        check_path_arguments(args, command_parser(parser, args.command))
        return _dispatch(args)
    except LoraPipelineError as exc:
        sys.stderr.write(f"lora-pipeline: error: {one_line(scrub(str(exc)))}\n")
        return 2
    except OSError as exc:
        if exc.errno not in USER_ERRNOS:
            return _internal_error(exc, args)
        sys.stderr.write(f"lora-pipeline: error: {one_line(scrub(describe_os_error(exc)))}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("lora-pipeline: interrupted; run the same command again to resume\n")
        return 130
    except Exception as exc:
        return _internal_error(exc, args)
    finally:
        os.umask(previous_umask)
        signal.signal(signal.SIGTERM, previous_sigterm)


def _internal_error(exc: BaseException, args: argparse.Namespace) -> int:
    """The last resort: a bug, in one line (exit 1); the traceback goes to a file, not the terminal."""
    import traceback

    where = _traceback_file(getattr(args, "log_dir", None), scrub("".join(traceback.format_exception(exc))))
    detail = one_line(scrub(str(exc)), limit=300)
    sys.stderr.write(f"lora-pipeline: internal error: {type(exc).__name__}: {detail}; traceback in {where}\n")
    return 1


def _traceback_file(run_dir: Path | None, text: str) -> str:
    """Write `text` into the run directory, else the state directory, else the temp directory: the first that
    takes it. Never raises: the error being reported matters more than its log."""
    import tempfile
    import time

    home = Path(os.environ.get("LORA_PIPELINE_HOME") or Path.home() / ".cache" / "lora-pipeline")
    name = f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (run_dir, home / "logs", Path(tempfile.gettempdir())):
        if folder is None or (folder == run_dir and not folder.is_dir()):
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8", errors="backslashreplace")
            return str(folder / name)
        except OSError:
            continue
    return "(not written: no writable directory)"


def run() -> None:
    """The console command (`lora-pipeline`, `python -m lora_pipeline.cli`): `main`, then a quick exit.

    Once torch's compiler stack has been imported (bitsandbytes and peft import it), the interpreter's own
    teardown of modules takes 1-2 s after everything is done. Every output is written (atomically) and closed
    by then, so the atexit handlers (logging, multiprocessing, temporary directories) run and the process
    ends without the teardown. In-process callers (tests, the Kubeflow components) call `main` instead."""
    import atexit
    import threading

    code = main()
    if any(not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        sys.exit(code)  # a normal exit joins non-daemon threads: keep that
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    setup_logging()
    if args.command == "models":
        return models_command(args)
    if args.command in TOOL_COMMANDS:
        return _tool_command(args)
    if args.command == "export":
        from lora_pipeline.export_command import export_command

        return export_command(args)
    if args.command == "compile":
        from lora_pipeline.kubeflow.command import compile_command

        return compile_command(args, resolve_config(args))
    demo = args.command == "demo" or getattr(args, "demo", False)
    run_dir = Path(args.run_dir) if getattr(args, "run_dir", None) else None
    base = None
    if demo or (run_dir and not getattr(args, "out", None) and was_demo(run_dir)):
        from lora_pipeline.demo import demo_config

        base = demo_config()
    stage = table.BY_NAME.get(args.command)
    if stage and getattr(args, "out", None) and args.run_dir:
        raise ConfigError("give -o (a run directory) or --out (this stage's output alone), not both", field="-o")
    if stage and getattr(args, "input", None) and not getattr(args, "out", None):
        raise ConfigError("only with --out (the stage alone); a run directory holds its own inputs", field="--input")
    if stage and getattr(args, "out", None):
        return _run_one_stage(args, stage, resolve_config(args, base))

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would write run.json and take the run directory's lock
        raise ConfigError(
            "a run directory is not run under torchrun: use `--train.num_procs N` (it launches the processes), "
            "or torchrun around `lora-pipeline train --input dataset=DIR --out DIR`",
            field="WORLD_SIZE",
        )
    from lora_pipeline import pipeline

    run_dir = run_dir or pipeline.default_run_dir(demo)
    args.log_dir = run_dir  # where an internal error's traceback goes, if it comes to that
    recorded = pipeline.recorded_config(run_dir) if run_dir.is_dir() else None
    config = resolve_config(args, _start_from(args, run_dir, recorded, base, demo))
    apply_verbosity(config.eval.verbosity)
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        return 0
    stages = table.NAMES if args.command in ("run", "demo") else (args.command,)
    restore_secrets(config, stages)  # a recorded config's placeholders: from the environment, or refused
    pipeline.check_recorded_source(config, run_dir, stages)
    fingerprint = preflight(config, stages, run_dir, "-o", check_source=not pipeline.source_is_recorded_only(config))
    manifest = pipeline.run(
        config, run_dir, stages=stages, force=args.force, source_fingerprint=fingerprint, invocation=_invocation(args)
    )
    print_summary(manifest)
    return 0


def _tool_command(args: argparse.Namespace) -> int:
    """`chat` and `preview`: read a run directory (its recorded config, for preview), run no stage."""
    run_dir = Path(args.run_dir) if args.run_dir else None
    if args.command == "chat":
        from lora_pipeline.chat import chat_command

        return chat_command(run_dir, args.prompt, args.max_new_tokens, args.temperature, args.system)
    from lora_pipeline import pipeline
    from lora_pipeline.preview import preview_command

    base = pipeline.recorded_config(run_dir) if run_dir and run_dir.is_dir() else None
    if args.demo or (base is None and run_dir and was_demo(run_dir)):
        from lora_pipeline.demo import demo_config

        base = demo_config()
    config = resolve_config(args, base)
    return preview_command(config, run_dir, own_data(args), args.rows, sys.stdout, preview_color(args))


def _run_one_stage(args: argparse.Namespace, stage: Stage, config: Config) -> int:
    """`STAGE --input NAME=DIR --out DIR`: the stage function alone, as a Kubeflow component runs it."""
    apply_verbosity(config.eval.verbosity)
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        return 0
    restore_secrets(config, (stage.name,))
    inputs: dict[str, Path] = {}
    for item in getattr(args, "input", []):
        name, sep, path = item.partition("=")
        if not sep or name not in stage.upstream:
            raise ConfigError(
                f"expected NAME=DIR with NAME one of {', '.join(stage.upstream)}, got {item!r}", field="--input"
            )
        if not Path(path).is_dir():
            raise ConfigError(f"{name}: no such directory: {path}", field="--input")
        inputs[name] = Path(path)
    missing = [up for up in stage.upstream if up not in inputs]
    if missing:
        raise ConfigError(f"missing {', '.join(f'{m}=DIR' for m in missing)}", field="--input")
    out = Path(args.out)
    preflight(config, (stage.name,), out, "--out")
    # Under torchrun every process runs this command; rank 0 holds the output's lock and reports.
    rank0 = os.environ.get("RANK", "0") == "0"
    lock = exclusive_lock(out.with_name(f".{out.name}.lock"), what=str(out)) if rank0 else contextlib.nullcontext()
    with lock:
        stage.call(getattr(config, stage.section), inputs, out)
    if rank0:
        print(f"{stage.name}: {out}")
        print_stage_summary(stage, out)
    return 0


def _start_from(
    args: argparse.Namespace, run_dir: Path, recorded: dict[str, Any] | None, base: dict[str, Any] | None, demo: bool
) -> dict[str, Any] | None:
    """The layer under this command's YAML files and flags: the run directory's recorded config, unless
    the command is the demo (always as shipped) or asks for `--fresh`; one line names what that carries over
    or drops."""
    if recorded is None:
        return base
    layers, flags = config_layers(args)
    fresh = demo or getattr(args, "fresh", False)
    carried = carried_over(recorded, from_dict(base or {}), given_options([*layers, flags]))
    line = carry_over_line(run_dir, carried, demo=demo, fresh=fresh)
    if line:
        sys.stderr.write(f"lora-pipeline: {line}\n")
    return base if fresh else recorded


def _invocation(args: argparse.Namespace) -> dict[str, Any]:
    """What this command changed on top of the recorded config: YAML files and flags, secrets redacted."""
    _, flags = config_layers(args)
    demo = args.command == "demo" or bool(getattr(args, "demo", False))
    return {
        "command": args.command,
        "demo": demo,
        "config_files": list(args.config),
        "overrides": redact_config(flags),
    }


if __name__ == "__main__":
    run()
