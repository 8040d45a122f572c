"""Logging for every command and torchrun worker: the format, the run's verbosity, the libraries' levels,
library log lines that say nothing about the user's settings (dropped wherever a stage runs), and secrets
scrubbed from every record (`install_log_filter`).

One table for the CLI (every command) and the train stage (also when called as a library function).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from lora_pipeline.redaction import scrub

# Third-party loggers whose INFO lines (seeds, "Model parallel was set to False", ...) show only at DEBUG.
LIBRARY_LOGGERS = ("lm_eval", "transformers", "datasets")

# logger name -> substrings of the messages to drop
LIBRARY_NOTICES: dict[str, tuple[str, ...]] = {
    # peft imports bitsandbytes even when nothing is quantized, and on a CPU with AVX512-BF16 bitsandbytes then
    # warns that the optional `kernels` package is missing.
    "bitsandbytes.backends.cpu.ops": ("kernels-community",),
    # ... and, asking the Hub for that kernel while offline, `kernels` (0.19) says it skips the publisher trust
    # check; bitsandbytes then declines the unverified kernel and uses its own (nothing untrusted is loaded).
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    # The Trainer orders checkpoints by mtime, and says so when two saves come less than a second apart.
    "transformers.trainer_utils": ("mtime may not be reliable",),
    # The eval stage hands lm-eval a model it loaded itself (quantized as trained); lm-eval warns about that.
    "lm_eval.models.huggingface": ("pretrained` model kwarg is not of type", "already-initialized model"),
}


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message, its exception's traceback and its stack scrubbed. The traceback is rendered
    here, once, into `exc_text` (which formatters print instead of formatting `exc_info` again): a library's
    `log.debug(..., exc_info=True)` quotes whatever the exception holds (botocore: a response body echoing
    the request's Authorization header)."""
    try:
        message, formatted = record.getMessage(), True
    except Exception:  # a library's bad format string: its parts, scrubbed, not logging's error with the args
        message, formatted = f"{record.msg} {record.args!r}", False
    clean = scrub(message)
    if clean != message or not formatted:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[0] is not None:
        record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        record.exc_info = None  # a handler with its own formatting cannot reach the raw exception
    elif record.exc_text:
        record.exc_text = scrub(record.exc_text)
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
    record._lora_pipeline_scrubbed = True  # each handler's ScrubFilter need not do it again
    return record


class ScrubFilter(logging.Filter):
    """Scrubs every record that reaches a handler (see `scrub_record`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_lora_pipeline_scrubbed", False):  # made by another record factory than ours
            scrub_record(record)
        return True


class _ScrubbingFactory:
    """Wraps the log record factory: every record is scrubbed when it is made, whichever logger made it and
    whichever handlers it reaches (transformers and datasets print through handlers of their own, on
    loggers that do not propagate to the root, added whenever they are first imported)."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        return scrub_record(self.base(*args, **kwargs))


def install_log_filter() -> None:
    if not isinstance(logging.getLogRecordFactory(), _ScrubbingFactory):
        logging.setLogRecordFactory(_ScrubbingFactory(logging.getLogRecordFactory()))
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())


class _DropNotice(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def drop_library_notices() -> None:
    """Install the filters (idempotent)."""
    for name, texts in LIBRARY_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(texts))


def library_level(level: str | int) -> int:
    """The third-party libraries' level for the run's `level`: their warnings (and errors) at INFO and
    WARNING, their INFO and debug lines only at DEBUG, and only errors at ERROR."""
    value = logging.getLevelName(level) if isinstance(level, str) else level
    return value if value <= logging.DEBUG else max(value, logging.WARNING)


def set_library_levels(level: str | int) -> None:
    """Set the libraries' loggers (see `library_level`). transformers and datasets set their own level when
    first imported, from their VERBOSITY variables: those are set for DEBUG too."""
    value = library_level(level)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(value)
    if value <= logging.DEBUG:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "debug")
        os.environ.setdefault("DATASETS_VERBOSITY", "debug")


def setup_logging() -> None:
    """Log format and levels for a command or a torchrun worker; secrets scrubbed; no bars without a terminal."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.WARNING, format=fmt, datefmt="%H:%M:%S")
    logging.getLogger("lora_pipeline").setLevel(logging.INFO)
    logging.captureWarnings(True)  # library warnings go through the handlers, and so through the scrub filter
    install_log_filter()
    silence_library_noise()
    if not sys.stderr.isatty():
        # No terminal (CI, a pod's log): carriage-return progress bars become walls of text. The train stage
        # logs its own progress lines instead; tqdm reads TQDM_DISABLE for bars created without `disable`.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def apply_verbosity(level: str) -> None:
    """eval.verbosity sets the whole run's logging: this package's lines at `level`; libraries (lm-eval,
    transformers, datasets, ...) show their warnings, and their INFO lines only at DEBUG (they say little);
    ERROR/CRITICAL quiet their warnings as well."""
    logging.getLogger().setLevel(library_level(level))
    logging.getLogger("lora_pipeline").setLevel(logging.getLevelName(level))
    set_library_levels(level)


def silence_library_noise() -> None:
    """Warnings that say nothing about the user's settings, printed by libraries on every run."""
    # peft asks transformers for a deprecated attribute; nothing a user can change.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    drop_library_notices()
