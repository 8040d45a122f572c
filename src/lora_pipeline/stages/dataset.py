"""Dataset stage: fetch -> read -> normalise -> validate -> subset -> shuffle/split -> write.

Writes `train.jsonl`, `eval.jsonl` (rows as {"messages": [...]}) and `dataset.json` (source, sha256,
counts, rows dropped and why with the first examples).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import DataError
from lora_pipeline.files import atomic_dir, write_json_atomic, write_jsonl
from lora_pipeline.formats import RowError, to_messages

log = logging.getLogger(__name__)

READERS = {".jsonl": "jsonl", ".json": "json"}
MAX_EXAMPLES = 5  # first bad rows shown per reason


def prepare_dataset(cfg: DatasetConfig, out: Path) -> Path:
    from lora_pipeline import sources

    if not cfg.data_uri:
        raise DataError("required: a dataset location", field="dataset.data_uri")
    with tempfile.TemporaryDirectory(prefix="lora-pipeline-fetch-") as download_dir:
        path = sources.fetch(cfg.data_uri, Path(download_dir))
        files = _data_files(path)
        sha = _sha256(files)
        rows, dropped = _read_rows(files)

    if not rows:
        raise DataError(f"no usable row in {sources.redact(cfg.data_uri)} ({_summary(dropped)})", field="dataset")
    if cfg.subset:
        rows = rows[: cfg.subset]
    random.Random(cfg.seed).shuffle(rows)
    n_train = len(rows) if cfg.data_split >= 1.0 else max(1, round(len(rows) * cfg.data_split))
    if cfg.data_split < 1.0 and n_train == len(rows) and len(rows) > 1:
        n_train -= 1  # keep at least one eval row when a split was asked for
    train, evaluation = rows[:n_train], rows[n_train:]

    with atomic_dir(out) as tmp:
        write_jsonl(({"messages": m} for m in train), tmp / "train.jsonl")
        write_jsonl(({"messages": m} for m in evaluation), tmp / "eval.jsonl")
        write_json_atomic(
            {
                "source": sources.redact(cfg.data_uri),
                "files": [f.name for f in files],
                "sha256": sha,
                "rows_read": len(rows) + sum(len(v) for v in dropped.values()),
                "rows_used": len(rows),
                "train_rows": len(train),
                "eval_rows": len(evaluation),
                "dropped": {reason: {"count": len(v), "first_rows": v[:MAX_EXAMPLES]} for reason, v in dropped.items()},
                "config": {"data_split": cfg.data_split, "subset": cfg.subset, "seed": cfg.seed},
            },
            tmp / "dataset.json",
        )
    if dropped:
        log.warning("dataset: dropped %s", _summary(dropped))
    log.info("dataset: %d train rows, %d eval rows -> %s", len(train), len(evaluation), out)
    return out


def _data_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in READERS) if path.is_dir() else [path]
    if not files:
        raise DataError(f"no data file ({', '.join(READERS)}) in {path}", field="dataset.data_uri")
    for f in files:
        if f.suffix not in READERS:
            raise DataError(f"unsupported file type {f.suffix or '(none)'!r}: {f.name}", field="dataset.data_uri")
    return files


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_rows(files: list[Path]) -> tuple[list[list[dict]], dict[str, list[str]]]:
    rows: list[list[dict]] = []
    dropped: dict[str, list[str]] = {}
    for where, raw in _iter_raw(files):
        try:
            if isinstance(raw, _NotJson):
                raise RowError("not valid JSON")
            rows.append(to_messages(raw))
        except RowError as exc:
            dropped.setdefault(str(exc), []).append(where)
    return rows, dropped


def _iter_raw(files: list[Path]) -> Iterator[tuple[str, object]]:
    """(file:row, parsed row); a line that is not JSON becomes a RowError-carrying sentinel."""
    for f in files:
        if READERS[f.suffix] == "json":
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"not valid JSON: {exc}", field=f.name) from None
            data = data.get("data", data) if isinstance(data, dict) else data
            if not isinstance(data, list):
                raise DataError('expected a list of rows or {"data": [...]}', field=f.name)
            yield from ((f"{f.name}:{i}", r) for i, r in enumerate(data, 1))
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield f"{f.name}:{i}", json.loads(line)
                    except json.JSONDecodeError:
                        yield f"{f.name}:{i}", _NotJson()


class _NotJson:
    """Stands for a line that failed to parse, so it is counted like any other bad row."""


def _summary(dropped: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(v)} rows: {reason} (first: {v[0]})" for reason, v in dropped.items()) or "empty"
