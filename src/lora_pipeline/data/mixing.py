"""The dataset stage's locations as one list, and how weighted sources are mixed.

Every location (data_uri, each of `dataset.sources`, eval_uri) goes through the same fetch, read, validation,
redaction and fingerprint code; this module only names them, so that an error says which one failed, and
turns weights into the rows each source contributes.

Weights: a source of `n` valid rows and weight `w` contributes `round(w * n)` rows. For w <= 1 they are a
seeded sample without replacement; for w > 1 every row `int(w)` times, plus a seeded sample without
replacement of the rest (w = 2.5: each row twice, and half of them a third time). Sampling this way, not with
replacement, keeps every row of an upsampled source in the mix and the counts exact.
"""

from __future__ import annotations

import contextlib
import json
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import LoraPipelineError

URI_FIELD = "dataset.data_uri"  # the field the source and reader errors name


@dataclass(frozen=True)
class Location:
    uri: str
    weight: float
    option: str  # dataset.data_uri, dataset.sources[2], dataset.eval_uri: what an error names


def training_locations(cfg: DatasetConfig) -> list[Location]:
    """data_uri (weight 1) first, then the sources in the order given."""
    found = [Location(cfg.data_uri, 1.0, URI_FIELD)] if cfg.data_uri else []
    return found + [
        Location(s["uri"], float(s["weight"]), f"dataset.sources[{i}]") for i, s in enumerate(cfg.sources, 1)
    ]


def eval_location(cfg: DatasetConfig) -> Location | None:
    return Location(cfg.eval_uri, 1.0, "dataset.eval_uri") if cfg.eval_uri else None


def is_plain(cfg: DatasetConfig) -> bool:
    """One data_uri and nothing else: the spec's dataset stage, recorded as it always was."""
    return bool(cfg.data_uri) and not cfg.sources and not cfg.eval_uri


@contextlib.contextmanager
def about(loc: Location, several: bool) -> Iterator[None]:
    """An error while fetching or reading `loc` names it: the option and its URI (redacted) when the stage
    reads several locations; data_uri alone keeps its errors as they were."""
    from lora_pipeline.sources import redact

    try:
        yield
    except LoraPipelineError as exc:
        if not several and loc.option == URI_FIELD:
            raise
        message = str(exc)
        if exc.field == URI_FIELD:
            message = message.removeprefix(f"{URI_FIELD}: ")
        raise type(exc)(message, field=f"{loc.option} ({redact(loc.uri)})") from None


def fingerprint(cfg: DatasetConfig) -> str:
    """The content identity of every location, for the dataset stage's cache key: a plain data_uri's as it
    always was (caches stay valid), else each location's with its option and weight."""
    from lora_pipeline import sources

    if is_plain(cfg):
        return sources.fingerprint(cfg.data_uri or "")
    locations = [*training_locations(cfg), *filter(None, [eval_location(cfg)])]
    several = len(locations) > 1
    found = []
    for loc in locations:
        with about(loc, several):
            found.append([loc.option, loc.weight, sources.fingerprint(loc.uri)])
    return json.dumps(found)


def mixed_rows(ranges: list[tuple[int, int]], weights: list[float], seed: int) -> tuple[array, list[int]]:
    """The spool indices of the mix, sources in order, and the rows each source contributes. `ranges` are the
    [start, end) spool indices of each source's valid rows."""
    order: array = array("q")
    counts = []
    for k, ((start, end), weight) in enumerate(zip(ranges, weights, strict=True)):
        n = end - start
        if weight == 1.0:
            order.extend(range(start, end))
            counts.append(n)
            continue
        take = round(weight * n)
        copies, rest = divmod(take, n) if n else (0, 0)
        for _ in range(copies):
            order.extend(range(start, end))
        rng = random.Random(seed * 1_000_003 + k)  # each source its own stream: adding one leaves the others
        order.extend(sorted(rng.sample(range(start, end), rest)))
        counts.append(take)
    return order, counts
