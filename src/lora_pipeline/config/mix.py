"""`dataset.sources`: several data locations mixed into the training data, each with a weight.

YAML gives a list of `{uri, weight}` mappings (or bare URI strings); the repeatable flag
`--dataset.source URI[@WEIGHT]` gives one per flag. In that text form the weight is the suffix after the
LAST `@`, and only when that suffix is written as a number: `s3://user:p@ss@host/x.jsonl` has no weight
(its last `@` is followed by `host/x.jsonl`), `data.jsonl@0.5` has 0.5. A number that is not a positive,
finite weight (`@0`, `@-1`, `@nan`) is refused rather than read as part of the path; a URI that really ends
in `@<number>` is written in the YAML form, or with `@1` appended.

Every entry is normalised to `{"uri": str, "weight": float}`: what run.json records and the compiled
pipeline fixes in its dataset component.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lora_pipeline.errors import ConfigError
from lora_pipeline.redaction import redact_uri

MAX_WEIGHT = 1000.0  # a thousand copies of a source is a typo, and would fill the disk with its spool
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


def parse_sources(value: Any, name: str) -> list[dict[str, Any]]:
    """A YAML list, a JSON list string, one `URI[@WEIGHT]` string or the flag's list of them -> normalised
    entries, or one ConfigError naming the option and the entry."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                raise ConfigError("not a valid JSON list of sources", field=name) from None
        else:
            value = [text] if text else []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"expected a list of sources (URI[@WEIGHT] or {{uri, weight}}), got {value!r}", field=name)
    return [_entry(item, f"{name}[{i}]") for i, item in enumerate(value, 1)]


def _entry(item: Any, where: str) -> dict[str, Any]:
    if isinstance(item, str):
        uri, weight = split_weight(item.strip())
        return {"uri": _uri(uri, where), "weight": _weight(weight, uri, where)}
    if isinstance(item, dict):
        unknown = sorted(set(map(str, item)) - {"uri", "weight"})
        if unknown:
            raise ConfigError(f"unknown key {unknown[0]!r} (a source has uri and weight)", field=where)
        uri = _uri(item.get("uri"), where)
        return {"uri": uri, "weight": _weight(item.get("weight", 1.0), uri, where)}
    raise ConfigError(f"expected URI[@WEIGHT] or a mapping {{uri, weight}}, got {item!r}", field=where)


def split_weight(text: str) -> tuple[str, str | None]:
    """(`text` without its weight, the weight's text or None): the suffix after the last `@`, when a number."""
    head, sep, tail = text.rpartition("@")
    if sep and head and _NUMBER.fullmatch(tail.strip()):
        return head, tail.strip()
    return text, None


def _uri(uri: Any, where: str) -> str:
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError("a source needs a uri (a non-empty string)", field=where)
    return uri.strip()


def _weight(value: Any, uri: str, where: str) -> float:
    if value is None:
        return 1.0
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    number = float(value) if numeric or isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else math.nan
    if not (math.isfinite(number) and 0 < number <= MAX_WEIGHT):
        raise ConfigError(
            f"weight of {redact_uri(uri)} must be a number > 0 and <= {MAX_WEIGHT:g}, got {value!r}", field=where
        )
    return number
