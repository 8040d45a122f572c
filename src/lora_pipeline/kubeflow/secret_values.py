"""`compile` refuses a secret given as a value: the compiled YAML (parameter defaults, fixed values, the
TrainJob's env and command) is uploaded where a whole namespace reads it. Credentials reach the pods from
Kubernetes secrets instead, by name only (--hf-token-secret, --aws-secret, --registry-token-secret).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from typing import Any

from lora_pipeline.config import SECTIONS, Config, fields_of, parse_key_values
from lora_pipeline.errors import ConfigError
from lora_pipeline.redaction import is_redacted, looks_secret, reveal, safe_env_name, safe_model_arg, uri_credentials

_WHY = "would be written into the compiled YAML, readable by everyone who can read it"
# A secret env var that one of the compile options already mounts from a Kubernetes secret.
_MOUNTED = {
    "HF_TOKEN": "--hf-token-secret NAME (key HF_TOKEN)",
    "HUGGING_FACE_HUB_TOKEN": "--hf-token-secret NAME (key HF_TOKEN)",
    "AWS_ACCESS_KEY_ID": "--aws-secret NAME",
    "AWS_SECRET_ACCESS_KEY": "--aws-secret NAME",
    "AWS_SESSION_TOKEN": "--aws-secret NAME",
    "MODEL_REGISTRY_TOKEN": "--registry-token-secret NAME (key MODEL_REGISTRY_TOKEN)",
}
_NO_CREDENTIALS = "the value without them (a secret reaches the pods from a Kubernetes secret: --secret-env)"
_OTHER_ENV = "--secret-env NAME=SECRET:KEY (key KEY of the Kubernetes secret SECRET)"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


def secret_name(text: str) -> str:
    """A Kubernetes secret's name, or '' for none (argparse calls it on a `compile` flag's value)."""
    if text and not _SECRET_NAME.match(text):
        raise argparse.ArgumentTypeError(f"not a Kubernetes secret name (lowercase, digits, '-', '.'): {text!r}")
    return text


def refuse_secret_values(config: Config, flags: Iterable[tuple[str, str]] = ()) -> None:
    """Raise one ConfigError naming the option and the Kubernetes-secret option that replaces it. `flags`:
    (flag, value) of the compile flags written into the YAML (--package-spec, --pip-index-url, ...)."""
    token = reveal(config.registry.token)
    if token and not is_redacted(token):
        _refuse("registry.token", "a registry token", "--registry-token-secret NAME (key MODEL_REGISTRY_TOKEN)")
    for name, value in parse_key_values(config.train.env_vars).items():
        if value and not safe_env_name(name) and (looks_secret(name) or name in _MOUNTED):
            _refuse("train.env_vars", f"{name} looks like a secret, and its value", _MOUNTED.get(name, _OTHER_ENV))
        if value:  # a tracker's URI may carry them (MLFLOW_TRACKING_URI=https://user:pass@host)
            _refuse_uri("train.env_vars", value, _MOUNTED.get(name, _OTHER_ENV))
    for key, value in config.eval.model_args.items():
        if value not in (None, "") and not safe_model_arg(key) and looks_secret(key):
            hint = "--hf-token-secret NAME (lm-eval reads HF_TOKEN from the environment)"
            _refuse("eval.model_args", f"{key} looks like a secret, and its value", hint)
    for field, value in _strings(config):
        _refuse_uri(field, value)
    pip_hint = "an index or package URL without them (pip reads credentials from ~/.netrc or PIP_* variables)"
    for flag, value in flags:
        _refuse_uri(flag, value, pip_hint if flag.startswith(("--package", "--pip")) else _NO_CREDENTIALS)


def parse_secret_env(items: list[str], component: str | None = None) -> tuple[tuple[str, str, str], ...]:
    """--secret-env NAME=SECRET:KEY (KEY defaults to NAME) -> ((NAME, SECRET, KEY), ...), or one ConfigError."""
    if items and component:
        raise ConfigError(
            "a component alone has no pod to mount a secret in: compile the pipeline, or mount the secret "
            "where the component is used",
            field="--secret-env",
        )
    out = []
    for item in items:
        name, _, ref = item.partition("=")
        secret, _, key = ref.partition(":")
        key = key or name
        if not (_ENV_NAME.match(name) and _SECRET_NAME.match(secret) and _SECRET_KEY.match(key)):
            where = f" in the one for {name}" if _ENV_NAME.match(name) else ""  # the value may be a secret: not shown
            raise ConfigError(
                f"expected NAME=SECRET:KEY (an env var name, a Kubernetes secret name, a key in it){where}",
                field="--secret-env",
            )
        out.append((name, secret, key))
    return tuple(out)


def _refuse_uri(field: str, value: str, hint: str = "") -> None:
    what = uri_credentials(value)
    if what:
        default = "--aws-secret NAME for s3://, --hf-token-secret NAME for hf:// and https://huggingface.co, " \
            "--secret-env OCI_PULL_SECRET_MODEL_DOWNLOAD=SECRET:.dockerconfigjson for oci:// (a pre-signed URL " \
            "cannot be compiled)"  # fmt: skip
        _refuse(field, f"the credentials in the URI ({what})", hint or default)


def _refuse(field: str, what: str, hint: str) -> None:
    raise ConfigError(f"{what} {_WHY}; instead, use {hint}", field=field)


def _strings(config: Config) -> list[tuple[str, str]]:
    found = []
    for section in SECTIONS:
        for f in fields_of(section):
            value = getattr(getattr(config, section), f.name)
            values = value.values() if isinstance(value, dict) else _as_list(value)
            # a list of mappings (dataset.sources' {uri, weight}): their strings too
            values = [w for v in values for w in (v.values() if isinstance(v, dict) else [v])]
            found += [(f"{section}.{f.name}", v) for v in values if isinstance(v, str)]
    return found


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] if value is not None else []
