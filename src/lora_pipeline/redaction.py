"""Secrets never leave the process: URI credentials, query strings and secret environment values are
scrubbed from everything the run stores or prints (run.json, --print_config, logs, error lines).

Two layers: `redact_config` rewrites the config before it is recorded or shown, and `scrub` is a last
pass over any text (installed as a logging filter), which also catches secrets that a library repeats
in its own messages.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MARK = "<redacted>"

# Environment variables whose values are credentials (HF, AWS, registry, OCI pull secrets).
SECRET_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MODEL_REGISTRY_TOKEN",
    "KF_PIPELINES_SA_TOKEN_PATH",
    "OCI_PULL_SECRET_MODEL_DOWNLOAD",
)
# key=value entries (train.env_vars, model_args) whose key says the value is a secret.
# A whole part of the name, so `max_tokens` or `max_new_tokens` (numbers, read back on a rerun) stay as they are.
_SECRET_KEY = re.compile(
    r"(?:^|_)(token|secret|password|passwd|credentials?|api_?key|access_?key|auth)(?:_|$)", re.IGNORECASE
)
_URI_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")
# Query strings of web URLs carry pre-signed tokens; those of hf:// (split, revision) are kept.
_URI_QUERY = re.compile(r"(\bhttps?://[^\s?#'\"]*)\?[^\s#'\"]+", re.IGNORECASE)


def secret_values() -> list[str]:
    """The values of secret environment variables set now (short ones are skipped: too many false hits)."""
    values = {os.environ.get(name, "") for name in SECRET_ENV} | {
        v for k, v in os.environ.items() if _SECRET_KEY.search(k) and k.isupper()
    }
    return sorted((v for v in values if len(v) >= 6), key=len, reverse=True)


def scrub(text: str) -> str:
    """Remove URI credentials, URI query strings and secret environment values from free text."""
    text = _URI_USERINFO.sub(rf"\1{MARK}@", text)
    text = _URI_QUERY.sub(rf"\1?{MARK}", text)
    for value in secret_values():
        text = text.replace(value, MARK)
    return text


def is_redacted(text: str) -> bool:
    return MARK in text


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, str):
        if key == "env_vars":  # KEY=VAL,...: hide the values of secret-looking keys
            return ",".join(_redact_pair(item) for item in value.split(","))
        return scrub(value)
    if isinstance(value, dict):
        return {k: MARK if _is_secret(str(k), v) else _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(key, v) for v in value]
    return value


def _is_secret(key: str, value: Any) -> bool:
    """Only strings can be credentials; `<|...|>`-style values of *_token keys are special tokens, not secrets."""
    return isinstance(value, str) and bool(_SECRET_KEY.search(key)) and not value.startswith("<")


def _redact_pair(item: str) -> str:
    name, sep, _ = item.partition("=")
    return f"{name}={MARK}" if sep and _SECRET_KEY.search(name) else scrub(item)


def redact_config(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of a config dict ({section: {option: value}}) that is safe to store and print."""
    return {section: {k: _redact_value(k, v) for k, v in values.items()} for section, values in config.items()}


class ScrubFilter(logging.Filter):
    """Scrubs every record that reaches a handler, whichever library logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, ScrubFilter) for f in handler.filters):
            handler.addFilter(ScrubFilter())
