"""`lora-pipeline preview`: the first rows as the model sees them, with the trained tokens marked.

Rows are rendered and labelled by the trainer's own code (tokenization.chat_tokens / encode_text) with the
run's tokenizer, chat template (`train.chat_template`) and `train.max_seq_len`, so what is marked is exactly
what carries the loss; as axolotl's `preprocess --debug` shows it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import IO, Any

from lora_pipeline.config import Config
from lora_pipeline.errors import ConfigError
from lora_pipeline.files import read_jsonl
from lora_pipeline.stages.outputs import TRAIN_ROWS

PLAIN_MARKS = ("[[", "]]")
COLOR_MARKS = ("\x1b[1;32m", "\x1b[0m")  # bold green on a terminal


def dataset_rows(config: Config, run_dir: Path | None, own_data: bool) -> list[dict]:
    """The dataset stage's train rows: the run directory's, unless this command names its own data (or the
    run has none yet): then the dataset stage runs into a temporary directory (nothing is written to RUN)."""
    stored = stored_rows(config, run_dir, own_data)
    if stored is not None:
        return read_jsonl(stored)
    from lora_pipeline.stages import BY_NAME

    with tempfile.TemporaryDirectory(prefix="lora-pipeline-preview-") as tmp:
        out = BY_NAME["dataset"].call(config.dataset, {}, Path(tmp) / "dataset")
        return read_jsonl(Path(out) / TRAIN_ROWS)


def stored_rows(config: Config, run_dir: Path | None, own_data: bool) -> Path | None:
    """The run directory's train rows to read, or None when the dataset stage is to run; a ConfigError naming
    -o when there is neither (checked before the tokenizer loads: a run directory without a dataset would
    otherwise be reported as the default model's tokenizer failing to load)."""
    stored = run_dir / "dataset" / TRAIN_ROWS if run_dir else None
    if stored is not None and stored.is_file() and not own_data:
        return stored
    if not config.dataset.data_uri:
        where = f"no dataset stage output in {run_dir}" if run_dir else "no run directory"
        raise ConfigError(f"{where}: give a run directory with a dataset stage, or a dataset location", field="-o")
    return None


def run_tokenizer(config: Config) -> Any:
    """The tokenizer the train stage would use: the base model's, with `train.chat_template` applied."""
    from lora_pipeline.chat_templates import apply_chat_template_option
    from lora_pipeline.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(config.train.model, fetch=True), config.train.trust_remote_code)
    apply_chat_template_option(tokenizer, config.train.chat_template)
    return tokenizer


def render_row(tokenizer: Any, row: dict, max_seq_len: int, marks: tuple[str, str]) -> tuple[str, str]:
    """(header, text with the trained spans between `marks`) for one dataset row."""
    from lora_pipeline.tokenization import IGNORE_INDEX, chat_tokens, encode_text

    if "messages" in row:
        text, offsets, ids, labels = chat_tokens(tokenizer, row["messages"], max_seq_len)
        total = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        trained = [label != IGNORE_INDEX for label in labels]
        shown = _marked(text, offsets, trained, marks)
    else:
        enc = encode_text(tokenizer, row["text"], max_seq_len) or {"input_ids": [], "labels": []}
        ids = enc["input_ids"]
        total = len((encode_text(tokenizer, row["text"], 1 << 30) or {"input_ids": []})["input_ids"])
        trained = [True] * len(ids)
        shown = f"{marks[0]}{tokenizer.decode(ids)}{marks[1]}" if ids else ""
    header = f"{len(ids)} tokens, {sum(trained)} trained"
    if total > len(ids):
        header += f" (cut at train.max_seq_len {max_seq_len})"
    if not any(trained):
        header += "; dropped in training: no trained token left"
    return header, shown


def _marked(text: str, offsets: list[tuple[int, int]], trained: list[bool], marks: tuple[str, str]) -> str:
    """`text` up to its last kept token, each run of trained tokens between the marks."""
    out, pos, inside = [], 0, False
    for (start, end), on in zip(offsets, trained, strict=True):
        if on != inside:
            out.append(text[pos:start])
            out.append(marks[0] if on else marks[1])
            pos, inside = start, on
        out.append(text[pos:end])
        pos = end
    if inside:
        out.append(marks[1])
    return "".join(out)


def preview_command(
    config: Config, run_dir: Path | None, own_data: bool, rows: int, out: IO[str], color: bool | None = None
) -> int:
    """Print the first `rows` rows of the run's (or the given) dataset as the train stage tokenizes them."""
    if rows < 1:
        raise ConfigError(f"must be at least 1, got {rows}", field="--rows")
    stored_rows(config, run_dir, own_data)
    tokenizer = run_tokenizer(config)
    data = dataset_rows(config, run_dir, own_data)[:rows]
    marks = COLOR_MARKS if (out.isatty() if color is None else color) else PLAIN_MARKS
    from lora_pipeline.tokenization import IGNORE_INDEX

    legend = f"legend: {marks[0]}trained{marks[1]} tokens carry the loss; the rest is context (label {IGNORE_INDEX})"
    out.write(legend + "\n")
    for i, row in enumerate(data, 1):
        header, shown = render_row(tokenizer, row, config.train.max_seq_len, marks)
        out.write(f"--- row {i}: {header} ---\n{shown}\n")
    out.flush()
    return 0
