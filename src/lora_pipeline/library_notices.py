"""Library log lines that say nothing about the user's settings, dropped wherever a stage runs.

One table for the CLI (every command) and the train stage (also when called as a library function).
"""

from __future__ import annotations

import logging

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
