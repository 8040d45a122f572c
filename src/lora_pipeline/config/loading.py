"""Filling the config from YAML and CLI strings, and validating it: one ConfigError naming the field."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import types
import typing
import unicodedata
from typing import Any

from lora_pipeline.config.mix import parse_sources
from lora_pipeline.config.schema import SECTIONS, Config, field_type, fields_of
from lora_pipeline.errors import ConfigError
from lora_pipeline.redaction import MARK, Secret, is_redacted

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is optional) for `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value or a CLI string into the field's type, or raise one ConfigError naming the field."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"expected {_type_name(base)}, got null", field=name)
    origin = typing.get_origin(base) or base
    if isinstance(value, Secret):  # already typed (a config copied from another)
        return value
    try:
        if origin is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if origin is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value.strip()) if isinstance(value, str) else int(value)
        if origin is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"expected a finite number, got {value!r}", field=name)
            return number
        if origin is str:
            # text, or a number or date YAML read as one (`version: 1.0`, `cpu: 4`, `description: 2024-05-01`);
            # str() of anything else (a YAML !!binary, !!set) is Python's spelling of it, not what was written
            if isinstance(value, bool) or not isinstance(value, (str, int, float, datetime.date)):
                raise ValueError
            return str(value)
        if origin is list and typing.get_args(base) == (dict,):  # dataset.sources: its own one-line errors
            return parse_sources(value, name)
        if origin is list:
            return _parse_list(value)
        if origin is dict:
            parsed = _parse_dict(value)
            if name in TYPED_VALUES and isinstance(value, str) and not value.strip().startswith("{"):
                return {key: arg_value(val) for key, val in parsed.items()}
            return parsed
    except (ValueError, TypeError, json.JSONDecodeError):
        shown = value if len(repr(value)) < 60 else repr(value)[:57] + "..."
        raise ConfigError(f"expected {_type_name(base)}, got {shown!r}", field=name) from None
    raise TypeError(f"unsupported config type {tp} for {name}")  # a bug in this file, not user input


def _parse_list(value: Any) -> list[str]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            return [v.strip() for v in text.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError
    return list(value)


def _parse_dict(value: Any) -> dict:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            value = json.loads(text)
        else:
            return parse_key_values(text)
    if not isinstance(value, dict):
        raise ValueError
    return dict(value)


def parse_key_values(text: str) -> dict[str, str]:
    """'a=1,b=2' -> {'a': '1', 'b': '2'} (the spec's format for labels, annotations and env vars)."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError
        out[key.strip()] = val.strip()
    return out


# Mappings handed to lm-eval: their `k=v` strings are typed as lm-eval's own CLI types them, so that
# `--eval.gen_kwargs temperature=0` gives the number 0 (labels, annotations and env vars stay strings).
TYPED_VALUES = frozenset({"eval.gen_kwargs", "eval.model_args"})


def arg_value(text: str) -> Any:
    """One `k=v` value typed like lm_eval.utils.handle_arg_string (0.4.13): true/false, none, a quoted string
    as written, an integer, a number, else the string. Kept here so the CLI starts without importing lm-eval."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    lower = text.lower()
    if lower in ("true", "false"):
        return lower == "true"
    if lower == "none":
        return None
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp) or tp
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        origin, "a list" if origin is list else "a mapping"
    )


def from_dict(data: dict[str, Any] | None, base: Config | None = None) -> Config:
    """Overlay a nested {section: {field: value}} mapping on `base` (or the defaults); unknown keys fail."""
    config = dataclasses.replace(base) if base else Config()
    for section_name, values in (data or {}).items():
        if section_name not in SECTIONS:
            shown = section_name if isinstance(section_name, str) else repr(section_name)  # YAML `1:`, `~:`
            raise ConfigError(f"unknown section (expected one of {', '.join(SECTIONS)})", field=shown)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError("expected a mapping of options", field=section_name)
        section = dataclasses.replace(getattr(config, section_name))
        known = {f.name for f in fields_of(section_name)}
        for key, value in values.items():
            name = f"{section_name}.{key}"
            if key not in known:
                hint = _closest(key, known) if isinstance(key, str) else None  # YAML `1: 2`: no name to match
                raise ConfigError("unknown option" + (f" (did you mean {hint}?)" if hint else ""), field=name)
            value = coerce(_bool_choice(section_name, key, value), field_type(section_name, key), name)
            setattr(section, key, _as_secret(value) if _is_secret_field(section_name, key) else value)
        setattr(config, section_name, section)
    return config


def _bool_choice(section: str, key: str, value: Any) -> Any:
    """YAML's `true`/`false` for a text option whose choices include them (auto|true|false): their text."""
    choices = next(f.metadata.get("choices") for f in fields_of(section) if f.name == key) or ()
    if isinstance(value, bool) and {"true", "false"} <= set(choices):
        return str(value).lower()
    return value


def _is_secret_field(section: str, key: str) -> bool:
    return any(f.name == key and f.metadata.get("secret") for f in fields_of(section))


def _as_secret(value: Any) -> Any:
    """A credential option's value as a Secret; the placeholder recorded in run.json is no value at all."""
    if isinstance(value, Secret) or not isinstance(value, str) or not value:
        return value
    return "" if value == MARK else Secret(value)


def restore_secrets(config: Config, stages: tuple[str, ...]) -> Config:
    """Replace the `<redacted>` placeholders that a config restored from run.json holds, for the sections of
    `stages`, so that no placeholder is ever used as a value: an env_vars value comes from the environment
    variable of the same name; anything else must be given again (one ConfigError naming the option).
    The dataset's locations (data_uri, sources, eval_uri) are checked by the pipeline (a cached dataset stage
    does not need them)."""
    t = config.train
    if "train" in stages and MARK in t.env_vars:
        items = []
        for name, val in parse_key_values(t.env_vars).items():
            if val == MARK:
                if name not in os.environ:
                    raise ConfigError(
                        f"{name}'s value is not recorded in run.json: set {name} in the environment, "
                        f"or give --train.env_vars again",
                        field="train.env_vars",
                    )
                val = os.environ[name]
            items.append(f"{name}={val}")
        t.env_vars = ",".join(items)
    for key, val in config.eval.model_args.items() if "eval" in stages else ():
        if isinstance(val, str) and val == MARK:
            raise ConfigError(
                f"{key}'s value is not recorded in run.json: give --eval.model_args {key}=VALUE again",
                field="eval.model_args",
            )
    sections = {"dataset": "dataset", "train": "train", "eval": "eval", "register": "registry"}
    for section_name in (sections[s] for s in stages if s in sections):
        for f in fields_of(section_name):
            value = getattr(getattr(config, section_name), f.name)
            recorded_uri = f"{section_name}.{f.name}" in ("dataset.data_uri", "dataset.eval_uri")
            if not recorded_uri and isinstance(value, str) and is_redacted(value):
                raise ConfigError(
                    f"the recorded value had credentials, which are never stored: give --{section_name}.{f.name} again",
                    field=f"{section_name}.{f.name}",
                )
    return config


def _closest(key: str, known: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(known), n=1)
    return match[0] if match else None


_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
_DATA_FIELDS = ("messages", "conversations", "instruction", "input", "output", "system", "prompt", "completion", "text")
_K8S_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


def validate(config: Config) -> Config:
    """Ranges, enums and conflicts. Raises the first problem as one ConfigError naming its field."""
    for section_name in SECTIONS:
        section = getattr(config, section_name)
        for f in fields_of(section_name):
            _check_field(f"{section_name}.{f.name}", getattr(section, f.name), f.metadata)

    for where, uri in data_locations(config.dataset):
        if uri and is_local_uri(uri) and not os.path.exists(local_path(uri)):
            raise ConfigError(f"file not found: {local_path(uri)}{_weight_hint(uri)}", field=where)

    d = config.dataset
    for key in d.columns:
        if key not in _DATA_FIELDS:
            known = ", ".join(_DATA_FIELDS)
            raise ConfigError(f"unknown field {key!r} (expected one of {known})", field="dataset.columns")
        if not isinstance(d.columns[key], str) or not d.columns[key]:  # YAML gives numbers, lists, null
            raise ConfigError(f"{key}: expected a column name, got {d.columns[key]!r}", field="dataset.columns")
    if d.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", d.sha256):
        raise ConfigError("expected 64 hexadecimal digits", field="dataset.sha256")

    t = config.train
    if t.lora_load_in_4bit and t.lora_load_in_8bit:
        raise ConfigError(
            "4-bit and 8-bit quantization are exclusive: set one of them to false",
            field="train.lora_load_in_4bit/train.lora_load_in_8bit",
        )
    if t.num_procs != "auto" and not (t.num_procs.isdigit() and int(t.num_procs) >= 1):
        raise ConfigError(f"expected 'auto' or a positive integer, got {t.num_procs!r}", field="train.num_procs")
    for name in ("cpu", "memory"):
        if not _K8S_QUANTITY.match(getattr(t, name)):
            raise ConfigError(
                f"not a Kubernetes quantity: {getattr(t, name)!r} (e.g. 4, 500m, 32Gi)", field=f"train.{name}"
            )
    for name in ("labels", "annotations", "env_vars"):
        try:
            parse_key_values(getattr(t, name))
        except ValueError:
            raise ConfigError(
                f"expected key=value,key=value, got {getattr(t, name)!r}", field=f"train.{name}"
            ) from None

    e = config.eval
    if not e.tasks:
        raise ConfigError("at least one lm-eval task is needed", field="eval.tasks")
    if twice := sorted({t for t in e.tasks if e.tasks.count(t) > 1}):
        # lm-eval scores a name once, and results are keyed by it: the second mention would say nothing
        raise ConfigError(f"listed more than once: {', '.join(twice)}", field="eval.tasks")
    if e.limit == 0:
        raise ConfigError("expected -1 (all samples) or a positive number", field="eval.limit")
    if not re.match(r"^(auto(:[1-9]\d*)?|[1-9]\d*)$", e.batch_size):  # auto:N recomputes it N times
        raise ConfigError(
            f"expected 'auto', 'auto:N' or a positive integer, got {e.batch_size!r}", field="eval.batch_size"
        )

    r = config.registry
    if not (_SEMVER.match(r.version) or r.version == "auto"):
        raise ConfigError(
            f"not a semantic version (major.minor.patch) nor auto: {r.version!r}", field="registry.version"
        )
    for name in ("model_name", "author", "format_name", "format_version", "description"):
        value = getattr(r, name)
        if name != "description" and not value.strip():
            raise ConfigError("must not be empty", field=f"registry.{name}")
        # one-line names and labels (a description may have lines): a control character would break every
        # line that shows them, and a registry's UI or API may refuse them only after training
        allowed = "\n\t" if name == "description" else ""
        if bad := sorted({c for c in value if unicodedata.category(c) == "Cc" and c not in allowed}):
            raise ConfigError(
                f"control character(s) {', '.join(map(repr, bad))} in {value[:40]!r}", field=f"registry.{name}"
            )
    if r.address.strip().lower() not in ("", "local", "none"):
        _check_registry_address(r.address.strip())
    return config


def _check_registry_address(address: str) -> None:
    """http(s)://host[:port] or a bare host[:port]: another scheme (`ftp://x` reached x:8080 over http) or a
    URL no parser reads (`http://[::1`: an internal error in pre-flight) fails with the config."""
    from urllib.parse import urlsplit

    scheme, sep, _ = address.partition("://")
    if sep and scheme.lower() not in ("http", "https"):
        raise ConfigError(
            f"expected http://host or https://host (a bare host, local or none), got {address!r}",
            field="registry.address",
        )
    try:
        parts = urlsplit(address if sep else f"//{address}")
        parts.port  # noqa: B018 (reading it validates it)
    except ValueError:
        raise ConfigError(f"not a valid URL: {address!r}", field="registry.address") from None
    if not parts.hostname:
        raise ConfigError(f"no host in {address!r}", field="registry.address")


def data_locations(d: Any) -> list[tuple[str, str]]:
    """(option, URI) of every location the dataset stage reads: data_uri, each source, eval_uri."""
    found = [("dataset.data_uri", d.data_uri)] if d.data_uri else []
    found += [(f"dataset.sources[{i}]", s["uri"]) for i, s in enumerate(d.sources, 1)]
    return found + ([("dataset.eval_uri", d.eval_uri)] if d.eval_uri else [])


def _weight_hint(uri: str) -> str:
    """`data.jsonl@x` that does not exist where `data.jsonl` does: the text after `@` was meant as a weight."""
    head, sep, tail = uri.rpartition("@")
    if sep and head and os.path.exists(local_path(head)):
        return f" (a weight after the last @ must be a number > 0, got {tail!r})"
    return ""


def is_k8s_quantity(text: str) -> bool:
    """A Kubernetes resource quantity (4, 500m, 32Gi): what pod resources and a workspace PVC size take."""
    return bool(_K8S_QUANTITY.match(text))


def is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return os.path.expanduser(uri.removeprefix("file://"))


def _check_field(name: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"expected one of {', '.join(choices)}, got {value!r}", field=name)
    if "min" in meta and (value < meta["min"] or (meta.get("min_exclusive") and value == meta["min"])):
        op = ">" if meta.get("min_exclusive") else ">="
        raise ConfigError(f"must be {op} {meta['min']}, got {value}", field=name)
    if "max" in meta and (value > meta["max"] or (meta.get("max_exclusive") and value == meta["max"])):
        op = "<" if meta.get("max_exclusive") else "<="
        why = f" ({meta['why']})" if "why" in meta else ""
        raise ConfigError(f"must be {op} {meta['max']}, got {value}{why}", field=name)
