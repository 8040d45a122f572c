"""The `chat` and `preview` subcommands' flags: they read a run directory, and run no stage."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lora_pipeline.cli_options import Once

TOOL_COMMANDS = ("chat", "preview")


def add_tool_commands(sub: Any, add_config_flags: Callable[..., None]) -> None:
    """`chat -o RUN [--prompt TEXT]` and `preview [-o RUN] [--rows N] [--dataset.* / --train.* ...]`."""
    chat = sub.add_parser(
        "chat",
        help="Chat with a run's adapter on the terminal (or one answer with --prompt)",
        description="Chat with base model + adapter of a run directory, loaded as trained (quantization, chat "
        "template); answers stream as they are generated. Without --prompt, each line read is a message: "
        "/reset starts over, /exit or end of input ends.",
        usage="lora-pipeline chat -o RUN [--prompt TEXT] [--max_new_tokens N] [--temperature T] [--system TEXT]",
    )
    chat.add_argument(
        "-o", "--run_dir", default=None, metavar="RUN", help="Run directory (or a train output, or its adapter)"
    )
    chat.add_argument("--prompt", default=None, metavar="TEXT", action=Once, help="Answer this one message and exit")
    chat.add_argument("--max_new_tokens", type=int, default=256, metavar="N", help="Longest answer in tokens")
    chat.add_argument("--temperature", type=float, default=0.0, metavar="T", help="Sampling temperature (0 = greedy)")
    chat.add_argument(
        "--system", default="", metavar="TEXT", action=Once, help="A system message leading the conversation"
    )

    preview = sub.add_parser(
        "preview",
        help="Print the first dataset rows as the model sees them, trained tokens marked",
        description="Render the first rows through the train stage's own tokenization (tokenizer, chat template, "
        "max_seq_len) and mark the tokens that carry the loss. Reads RUN/dataset unless -c or --dataset.* "
        "options are given; then the dataset stage runs into a temporary directory.",
        usage="lora-pipeline preview [-c YAML] [-o RUN] [--demo] [--rows N] [--dataset.OPTION VALUE ...] "
        "[--train.OPTION VALUE ...]",
    )
    preview.add_argument("-c", "--config", action="append", default=[], metavar="YAML", help="YAML config file")
    preview.add_argument("-o", "--run_dir", default=None, metavar="RUN", help="Run directory to read")
    preview.add_argument("--demo", action="store_true", help="Preview the built-in demo's data and model")
    preview.add_argument("--rows", type=int, default=3, metavar="N", help="How many rows (default 3)")
    preview.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="Colour the marks")
    add_config_flags(preview, ("dataset", "train"), None)


def preview_color(args: argparse.Namespace) -> bool | None:
    return {"always": True, "never": False}.get(args.color)


def own_data(args: argparse.Namespace) -> bool:
    """Whether this command names its data itself (a YAML file or a --dataset.* flag)."""
    return bool(args.config) or args.demo or any(k.startswith("cfg:dataset.") for k, v in vars(args).items())
