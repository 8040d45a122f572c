"""Dataset stage: fetch -> read -> normalise -> validate -> subset -> shuffle/split -> write.

Writes `train.jsonl`, `eval.jsonl` (rows as {"messages": [...]}) and `dataset.json` (source, sha256,
counts, rows dropped and why with the first examples).
"""

from __future__ import annotations

import codecs
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
from lora_pipeline.formats import FILE_TYPES, RowError, data_files, to_messages

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # first bad rows shown per reason


def prepare_dataset(cfg: DatasetConfig, out: Path) -> Path:
    from lora_pipeline import sources

    if not cfg.data_uri:
        raise DataError("required: a dataset location", field="dataset.data_uri")
    with tempfile.TemporaryDirectory(prefix="lora-pipeline-fetch-") as download_dir:
        path = sources.fetch(cfg.data_uri, Path(download_dir))
        files = data_files(path)
        names = [_label(f, path) for f in files]
        sha = _sha256(files)
        rows, dropped = _read_rows(files, path)

    if not rows:
        raise DataError(f"no usable row in {sources.redact(cfg.data_uri)} ({_summary(dropped)})", field="dataset")
    rows_read, rows_valid = len(rows) + sum(len(v) for v in dropped.values()), len(rows)
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
                "files": names,
                "sha256": sha,
                "rows_read": rows_read,  # before `subset`
                "rows_valid": rows_valid,
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


def _label(f: Path, root: Path) -> str:
    """How rows of `f` are named in dataset.json: its path inside a directory source, else its name."""
    return f.relative_to(root).as_posix() if root.is_dir() else f.name


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _read_rows(files: list[Path], root: Path) -> tuple[list[list[dict]], dict[str, list[str]]]:
    rows: list[list[dict]] = []
    dropped: dict[str, list[str]] = {}
    for where, raw in _iter_raw(files, root):
        try:
            if isinstance(raw, RowError):
                raise raw
            rows.append(to_messages(raw))
        except RowError as exc:
            dropped.setdefault(str(exc), []).append(where)
    return rows, dropped


def _iter_raw(files: list[Path], root: Path) -> Iterator[tuple[str, object]]:
    """(file:row, parsed row) in file order; a JSONL line that cannot be parsed comes as a RowError in place
    of the row, so it is counted like any other bad row. A JSON file is one document: if it cannot be
    parsed, no row of it can be trusted, and that is one DataError."""
    for f in files:
        name = _label(f, root)
        if FILE_TYPES[f.suffix] == "json":
            yield from ((f"{name}:{i}", row) for i, row in enumerate(_json_rows(f, name), 1))
        else:
            yield from _jsonl_rows(f, name)


def _jsonl_rows(f: Path, name: str) -> Iterator[tuple[str, object]]:
    # Binary, one line per b"\n" (JSONL's separator), each decoded strictly: a line of bytes that are not
    # UTF-8 is dropped and named, never read with replacement characters in place of the bytes.
    with open(f, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            where = f"{name}:{i}"
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if i == 1 else raw).decode("utf-8")
            except UnicodeDecodeError:
                yield where, RowError("not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError:
                yield where, RowError("not valid JSON")


def _json_rows(f: Path, name: str) -> list:
    data = f.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{name} is not valid UTF-8 (line {line})", field="dataset.data_uri") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{name} is not valid JSON: {exc}", field="dataset.data_uri") from None
    rows = rows.get("data", rows) if isinstance(rows, dict) else rows
    if not isinstance(rows, list):
        raise DataError(f'{name}: expected a list of rows or {{"data": [...]}}', field="dataset.data_uri")
    return rows


def _summary(dropped: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(v)} rows: {reason} (first: {v[0]})" for reason, v in dropped.items()) or "empty"
