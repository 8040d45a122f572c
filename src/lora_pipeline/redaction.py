"""Secrets never leave the process: URI credentials, query strings and secret values are scrubbed from
everything the run stores or prints (run.json, --print_config, the report, logs, error lines, compiled YAML).

Three layers, each by construction rather than by pattern:
- `Secret`: a credential option (registry.token) travels as this type, which renders as `<redacted>` in
  str/repr/format, YAML (safe_dump) and JSON (`json_default`); only `reveal()` gives the value.
- `redact_config`: the copy of the config that is recorded or shown. URIs are parsed (`redact_uri`), and the
  values of `train.env_vars` and `eval.model_args` are kept only for names known to be harmless (allowlists).
- `scrub`: a last pass over any text (every log record's, see logs.py). It parses every `scheme://` token and
  replaces the secret values this process knows of: secret environment variables and the secret parts of
  the config (`remember_config`).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

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
# Names whose values are settings, never credentials: their values are recorded as given. Every other
# env_vars / model_args value is recorded as MARK (a new name is unknown, so it is treated as a secret).
SAFE_ENV = frozenset(
    {
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING", "CUDA_DEVICE_ORDER",
        "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
        "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DISABLE_PROGRESS_BARS", "PYTORCH_CUDA_ALLOC_CONF", "TQDM_DISABLE",
        "PYTHONUNBUFFERED", "PYTHONHASHSEED", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DISABLED", "WANDB_SILENT",
    }
)  # fmt: skip
SAFE_ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "CUBLAS_", "OMP_")
SAFE_MODEL_ARGS = frozenset(
    {
        "dtype", "torch_dtype", "max_length", "max_model_len", "trust_remote_code", "device", "device_map",
        "batch_size", "max_batch_size", "parallelize", "revision", "gpu_memory_utilization",
        "tensor_parallel_size", "data_parallel_size", "add_bos_token", "attn_implementation", "load_in_4bit",
        "load_in_8bit", "quantization", "use_fast_tokenizer", "truncation", "logits_cache", "enforce_eager",
        "seed", "swap_space", "max_gen_toks", "prefix_token_id", "pad_token", "bos_token", "eos_token",
        "unk_token", "backend", "enable_thinking", "pretrained", "peft", "tokenizer", "softmax_dtype",
        "enable_lora", "max_lora_rank", "max_loras", "lora_local_path", "max_num_seqs", "kv_cache_dtype",
    }
)  # fmt: skip
# A name that looks like a credential's, by its parts (`DB_PASS`, `GITHUB_PAT`, `api-key`), so that counts
# such as `max_tokens` do not. `compile` refuses values under such names.
_SECRET_PARTS = frozenset(
    {
        "token", "key", "secret", "pass", "passwd", "password", "pwd", "pat", "credential", "credentials",
        "auth", "apikey", "private", "signature", "sig", "cookie", "session", "bearer", "cert", "jwt",
    }
)  # fmt: skip
_SECRET_SUBSTRINGS = ("secret", "passw", "credential", "apikey", "accesskey", "privatekey", "token")
_URI_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# `user:password@host...` without a scheme (a pip --trusted-host, a bare authority): a ':' then an '@' before any
# '/', so that an image `registry:5000/repo@sha256:...` or a path is not one.
_BARE_USERINFO = re.compile(r"^[^/@:\s]+:[^/@\s]*@[^/@\s]")
_HOST_PORT = re.compile(r"^(\[[^\]]*\]|[^:\[\]]*)(:\d*)?$")
_TOKEN_END = re.compile(r"[\s'\"`]")
_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_MIN_ENV_SECRET = 6  # secret env values shorter than this are not scrubbed from text: too many false hits
_MIN_REMEMBERED = 4
# Variables every shell or desktop sets whose names read like a credential's (PWD: "pwd", *SESSION*: "session",
# SSH_AUTH_SOCK: "auth") but hold a directory or an id: scrubbing them would hide the working directory in
# every error line.
_SHELL_ENV = frozenset(
    {
        "PWD", "OLDPWD", "SSH_AUTH_SOCK", "SESSION_MANAGER", "DBUS_SESSION_BUS_ADDRESS", "DESKTOP_SESSION",
        "XDG_SESSION_ID", "XDG_SESSION_TYPE", "XDG_SESSION_CLASS", "XDG_SESSION_DESKTOP", "GDMSESSION",
    }
)  # fmt: skip
_remembered: set[str] = set()


class Secret:
    """A credential: renders as MARK everywhere (str, repr, f-strings, YAML, JSON); `reveal()` is the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = str(value)
        remember(self._value)

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return MARK

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return MARK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __deepcopy__(self, memo: dict) -> Secret:
        return self


def reveal(value: Any) -> Any:
    """The value behind a Secret; anything else as it is."""
    return value.reveal() if isinstance(value, Secret) else value


def json_default(value: Any) -> Any:
    """`json.dumps(..., default=json_default)`: a Secret is written as MARK."""
    if isinstance(value, Secret):
        return MARK
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _register_yaml() -> None:
    import yaml

    for dumper in (yaml.SafeDumper, yaml.Dumper):
        dumper.add_representer(Secret, lambda d, _v: d.represent_str(MARK))


_register_yaml()


def looks_secret(name: str) -> bool:
    """True for a name that reads like a credential's (TOKEN, KEY, SECRET, PASS, PAT, CREDENTIAL, AUTH...)."""
    lower = name.lower()
    parts = set(re.split(r"[^a-z0-9]+", lower))
    return bool(parts & _SECRET_PARTS) or any(s in lower.replace("_", "").replace("-", "") for s in _SECRET_SUBSTRINGS)


def safe_env_name(name: str) -> bool:
    return (name in SAFE_ENV or name.startswith(SAFE_ENV_PREFIXES)) and not looks_secret(name)


def safe_model_arg(name: str) -> bool:
    return name in SAFE_MODEL_ARGS


# --- URIs ----------------------------------------------------------------------------------------------


def split_uri(uri: str) -> tuple[str, str | None, str, str | None, str | None] | None:
    """(scheme, userinfo, host+path, query, fragment) of `scheme://...`, or None for anything else.

    By hand, and stricter than a URL parser where it matters: the authority ends at the first '/', '?' or
    '#' as browsers read it, and when it holds userinfo (an '@', or a ':' that starts no port), the userinfo
    runs to the LAST '@', so that a password holding '@', '/', '?' or ':' never shows as host, path or query.
    An '@' after a plain host is the path's or query's (`https://host/@scope/x`). This runs in error paths
    too, where a second exception would hide the first: it never raises.
    """
    match = _URI_START.match(uri)
    if not match:
        return None
    scheme, rest = uri[: match.end() - 3], uri[match.end() :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    userinfo = None
    if "@" in rest and ("@" in authority or not _HOST_PORT.match(authority)):
        userinfo, rest = rest.rsplit("@", 1)
    rest, hash_sign, fragment = rest.partition("#")
    path, question_mark, query = rest.partition("?")
    return scheme, userinfo, path, query if question_mark else None, fragment if hash_sign else None


def redact_uri(uri: str) -> str:
    """`uri` with its userinfo and its query string (except hf:// options: split, revision) as MARK."""
    parts = split_uri(uri)
    if parts is None:
        return uri
    scheme, userinfo, path, query, fragment = parts
    out = f"{scheme}://" + (f"{MARK}@" if userinfo is not None else "") + path
    if query is not None:
        out += "?" + (query if scheme.lower() == "hf" and userinfo is None else MARK)
    return out + (f"#{fragment}" if fragment is not None else "")


def uri_secrets(uri: str) -> list[str]:
    """The secret parts of a URI (userinfo, its password, the query and its values), for `remember`."""
    parts = split_uri(uri)
    if parts is None:
        return []
    scheme, userinfo, _, query, _ = parts
    found = [userinfo, *(userinfo or "").split(":", 1)[1:]] if userinfo else []
    if query and scheme.lower() != "hf":
        found += [query, *(v for _, v in parse_qsl(query, keep_blank_values=True))]
    return [s for s in found if s]


def uri_credentials(uri: str) -> str | None:
    """What in `uri` is a credential, in words (for compile's refusal), or None. Free text (a description, a
    label's value, `key=https://...`) is searched for the URIs it quotes, as `scrub` finds them."""
    parts = split_uri(uri)
    if parts is None:
        if _BARE_USERINFO.match(uri):
            return "user:password@"
        quoted = (uri[start : _token_end(uri, start)] for start in _uri_starts(uri))
        return next(filter(None, (uri_credentials(q) for q in quoted if split_uri(q))), None)
    scheme, userinfo, _, query, _ = parts
    if userinfo is not None:
        return "user:password@"
    if query and scheme.lower() != "hf":
        signed = [k for k, _ in parse_qsl(query, keep_blank_values=True) if _signed_param(k)]
        if signed or scheme.lower() == "s3":
            return f"a signed query ({(signed or ['?'])[0]}=...)"
    return None


def _signed_param(name: str) -> bool:
    lower = name.lower()
    return looks_secret(name) or lower.startswith(("x-amz-", "x-goog-")) or lower in ("se", "sp", "sv", "st", "sr")


# --- remembered secrets and free text ----------------------------------------------------------------------


def remember(value: str) -> None:
    """Scrub `value` (and its quoted, escaped and URL-encoded forms) from all text this process prints."""
    if not isinstance(value, str) or len(value) < _MIN_REMEMBERED or value in MARK:
        return
    forms = {value, quote(value, safe=""), quote(value), unquote(value), repr(value)[1:-1], json.dumps(value)[1:-1]}
    _remembered.update(f for f in forms if len(f) >= _MIN_REMEMBERED and f not in MARK)


def remember_config(config: dict[str, dict[str, Any]]) -> None:
    """Remember the secret material of a config dict: URI credentials, and the env_vars / model_args values
    under names that are not known to be harmless."""
    for section in config.values():
        for key, value in section.items():
            _remember_value(key, value)


def _remember_value(key: str, value: Any) -> None:
    if isinstance(value, Secret):
        remember(value.reveal())
    elif isinstance(value, str):
        for secret in uri_secrets(value):
            remember(secret)
        if key == "env_vars":
            for name, val in _pairs(value):
                if not safe_env_name(name):
                    remember(val)
    elif isinstance(value, dict):
        for k, v in value.items():
            if key == "model_args" and not safe_model_arg(str(k)) and isinstance(v, str):
                remember(v)
            _remember_value(str(k), v)
    elif isinstance(value, list):
        for v in value:
            _remember_value(key, v)


def secret_values() -> list[str]:
    """The secrets known now, longest first: secret env variables' values and the remembered ones."""
    values = {os.environ.get(name, "") for name in SECRET_ENV} | {
        v
        for k, v in os.environ.items()
        if k.isupper() and looks_secret(k) and not safe_env_name(k) and k not in _SHELL_ENV
    }
    values = {v for v in values if len(v) >= _MIN_ENV_SECRET} | _remembered
    return sorted(values, key=len, reverse=True)


def _token_end(text: str, start: int) -> int:
    end = _TOKEN_END.search(text, start)
    return end.start() if end else len(text)


def scrub(text: str) -> str:
    """Remove URI credentials, URI query strings and every known secret value from free text."""
    text = str(text)
    for value in secret_values():
        text = text.replace(value, MARK)
    out, pos = [], 0
    for start in _uri_starts(text):
        if start < pos:
            continue
        stop = _token_end(text, start)
        out += [text[pos:start], redact_uri(text[start:stop])]
        pos = stop
    return "".join(out) + text[pos:]


def _uri_starts(text: str) -> Iterator[int]:
    """Where each `scheme://` in `text` starts (as `_URI_START` would find them), found from its '://' back:
    the regex, tried at every position, is quadratic on a long run of letters (a 2 MB config value or data row
    in an error line took hours)."""
    colon = text.find("://")
    while colon != -1:
        start = colon
        while start > 0 and text[start - 1] in _SCHEME_CHARS:  # stops at the previous '://' at the latest
            start -= 1
        while start < colon and not text[start].isalpha():  # the run is ASCII: isalpha is A-Za-z
            start += 1
        if start < colon:
            yield start
        colon = text.find("://", colon + 3)


# Keyword names under which libraries take credentials (datasets' `token`, fsspec's storage_options
# `key`/`secret`/`password`, boto3's `aws_*`): a task YAML's dataset_kwargs may hold them.
_CREDENTIAL_KEYS = frozenset(
    {
        "token", "use_auth_token", "hf_token", "api_key", "apikey", "access_token", "auth_token", "password",
        "passwd", "secret", "key", "session_token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    }
)  # fmt: skip


def redact_record(value: Any) -> Any:
    """A library's JSON-like record (lm-eval's results, whose `configs` quote each task's YAML) made safe to
    store: a string under a credential keyword (`_CREDENTIAL_KEYS`) as MARK, every other string scrubbed."""
    if isinstance(value, dict):
        return {
            scrub(str(k)): MARK if str(k).lower() in _CREDENTIAL_KEYS and isinstance(v, str) and v else redact_record(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_record(v) for v in value]
    return scrub(value) if isinstance(value, str) else value


def scrub_argv() -> None:
    """Scrub this process's own command line in place, once its secrets are known: libraries record it as they
    find it (wandb stores `sys.argv` as its run's `args`, in the files it syncs)."""
    sys.argv[:] = [scrub(arg) for arg in sys.argv]
    if isinstance(getattr(sys, "orig_argv", None), list):
        sys.orig_argv[:] = [scrub(arg) for arg in sys.orig_argv]


def is_redacted(text: Any) -> bool:
    """True for text holding the placeholder (a Secret holds a value, so it is not)."""
    return not isinstance(text, Secret) and MARK in str(text)


# --- records ---------------------------------------------------------------------------------------------


def _pairs(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = item.partition("=")
        out.append((name.strip(), val.strip() if sep else ""))
    return out


def redact_env_vars(text: str) -> str:
    """KEY=VAL,... with the values of names outside the allowlist as MARK."""
    items = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, val = item.partition("=")
        keep = sep and safe_env_name(name.strip())
        items.append(f"{name}={scrub(val)}" if keep else f"{name}={MARK}" if sep else scrub(item))
    return ",".join(items)


def redact_model_args(args: dict[str, Any]) -> dict[str, Any]:
    """model_args with the values of keys outside the allowlist as MARK (lm-eval's recorded config too)."""
    return {k: _redact_value(str(k), v) if safe_model_arg(str(k)) else MARK for k, v in args.items()}


def _redact_model_args_text(text: str) -> str:
    try:
        parsed = json.loads(text) if text.strip().startswith("{") else dict(_pairs(text))
    except ValueError:
        return MARK
    if not isinstance(parsed, dict):
        return MARK
    return ",".join(f"{k}={v}" for k, v in redact_model_args(parsed).items())


def _redact_value(key: str, value: Any) -> Any:
    if isinstance(value, Secret) or (key == "token" and isinstance(value, str) and value):
        return MARK
    if isinstance(value, str) and key == "model_args":  # a flag as typed: k=v,... or JSON
        return _redact_model_args_text(value)
    if isinstance(value, str):
        return redact_env_vars(value) if key == "env_vars" else scrub(redact_uri(value))  # a whole URI, spaces too
    if isinstance(value, dict):
        if key == "model_args":
            return redact_model_args(value)
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_value(key, v) for v in value]
    return value


def redact_config(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of a config dict ({section: {option: value}}) that is safe to store and print."""
    return {
        section: {k: _redact_value(k, v) for k, v in values.items()} if isinstance(values, dict) else values
        for section, values in config.items()
    }
