"""Data files -> rows, streamed: JSONL, JSON, CSV, Parquet, Arrow and `datasets` save_to_disk directories.

`data_files` picks the files a local path stands for; `read_rows` yields (row number, row) from one of them,
a batch at a time for the columnar formats, so a file larger than memory can be read. A row that cannot be
decoded comes as a RowError in place of the row, so it is counted like any other bad row.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path

from lora_pipeline.data.formats import RowError
from lora_pipeline.data.json_stream import JsonLines, JsonStream
from lora_pipeline.errors import DataError
from lora_pipeline.files import confined

FIELD = "dataset.data_uri"
# suffix -> reader: "jsonl" one row per line, "json" a list of rows or {"data": [...]}, "csv" a header row
# then one row per record, "parquet" and "arrow" (IPC file or stream, as `datasets` writes) columnar.
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
# What `datasets.Dataset.save_to_disk` writes beside its .arrow files: metadata, not rows.
SAVED_META = ("state.json", "dataset_info.json", "dataset_dict.json")
BATCH_ROWS = 1024  # rows converted to Python objects at a time from columnar files


def data_files(path: Path, source: str = "") -> list[Path]:
    """The files a local source stands for: itself, or the data files under a directory in sorted order.

    The dataset stage reads exactly these and the source fingerprint hashes exactly these, so a file that
    would not be read (a README beside the data) cannot invalidate a cached dataset. `source` names the data
    in errors (the URI, where `path` is a temporary download directory).
    """
    if not path.is_dir():
        if path.suffix not in FILE_TYPES:
            raise DataError(f"unsupported file type {path.suffix or '(none)'!r}: {path.name}", field=FIELD)
        if path.exists() and not path.is_file():  # read twice (fingerprint, then rows): a FIFO hangs the second
            raise DataError(f"not a regular file (a FIFO, device or socket): {path}", field=FIELD)
        return [path]
    saved = _saved_dataset_files(path, source or str(path))
    if saved is not None:
        return saved
    files = sorted(
        p
        for p in path.rglob("*")
        if p.suffix in FILE_TYPES and p.is_file() and not (p.name in SAVED_META and (p.parent / "state.json").is_file())
    )
    if not files:
        raise DataError(f"no data file ({', '.join(FILE_TYPES)}) in {path}", field=FIELD)
    return files


def _saved_dataset_files(path: Path, source: str) -> list[Path] | None:
    """The .arrow files of a save_to_disk directory (a Dataset, or a DatasetDict's `train` split when it has
    one, else all its splits: the eval split is cut by data_split, not taken from the source); else None.

    The split names and file names come from the data itself, so each is confined to the directory."""
    if (path / "dataset_dict.json").is_file():
        splits = _listed(_json(path / "dataset_dict.json").get("splits"), "dataset_dict.json splits")
        chosen = ["train"] if "train" in splits else splits
        dirs = [confined(path, split, what="dataset_dict.json split", source=source) for split in chosen]
        return [f for d in dirs for f in _saved_dataset_files(d, source) or []]
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        entries = _listed(_json(path / "state.json").get("_data_files"), "state.json _data_files")
        names = [entry.get("filename") if isinstance(entry, dict) else None for entry in entries]
        return [confined(path, name, what="state.json _data_files filename", source=source) for name in names]
    return None


def _listed(value: object, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DataError(f"{what}: expected a list, got {type(value).__name__}", field=FIELD)
    return value


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise DataError(f"{path.name}: not a readable save_to_disk file ({reason})", field=FIELD) from None
    if not isinstance(data, dict):
        raise DataError(f"{path.name}: not a readable save_to_disk file (expected a JSON object)", field=FIELD)
    return data


def read_rows(f: Path, name: str) -> Iterator[tuple[int, object]]:
    """(row number, row) in file order; row numbers are lines for JSONL and CSV, 1-based records otherwise."""
    kind = FILE_TYPES[f.suffix]
    if kind == "jsonl":
        rows = _jsonl_rows(f)
    elif kind == "json":
        rows = _json_file_rows(f, name)
    elif kind == "csv":
        rows = _csv_rows(f, name)
    else:
        rows = enumerate(_columnar_rows(f, kind, name), 1)
    return ((i, row if isinstance(row, RowError) else row_problem(row) or row) for i, row in rows)


MAX_DEPTH = 64  # a chat row is 4 levels deep; deeper rows are not data, and recursion on them would fail


def row_problem(row: object) -> RowError | None:
    """A decoded row that later steps could not handle: nested deeper than MAX_DEPTH, or a string holding a lone
    surrogate (a JSON `\\ud800` escape), which no UTF-8 file can be written with. Walked without recursion."""
    stack = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return RowError(f"nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return RowError("text with a lone surrogate (not valid Unicode)")
        elif isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)
    return None


def parse_json(text: str) -> object:
    """json.loads, with the inputs it fails on other than by JSONDecodeError (a number of more than 4300 digits,
    nesting deeper than the interpreter's recursion limit) raised as RowError."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise RowError("not valid JSON") from None
    except ValueError:
        raise RowError("a number too long to read (more than 4300 digits)") from None
    except RecursionError:
        raise RowError(f"nested more than {MAX_DEPTH} levels deep") from None


def _jsonl_rows(f: Path) -> Iterator[tuple[int, object]]:
    # Binary, one line per b"\n" (JSONL's separator), each decoded strictly: a line of bytes that are not
    # UTF-8 is dropped and named, never read with replacement characters in place of the bytes.
    with open(f, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            try:
                line = (raw.removeprefix(codecs.BOM_UTF8) if i == 1 else raw).decode("utf-8")
            except UnicodeDecodeError:
                yield i, RowError("not valid UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield i, parse_json(line)
            except RowError as exc:
                yield i, exc


def _json_file_rows(f: Path, name: str) -> Iterator[tuple[int, object]]:
    """A .json file's rows, decoded one at a time: one document, or JSON Lines under a .json name (as many datasets
    on the Hub ship, and `datasets` reads): an object followed by more data is read line by line, numbered by line."""
    try:
        with open(f, "rb") as fh:
            yield from enumerate(JsonStream(fh, name).rows(), 1)
    except JsonLines:
        yield from _jsonl_rows(f)


def _csv_rows(f: Path, name: str) -> Iterator[tuple[int, object]]:
    # surrogateescape keeps bytes that are not UTF-8 as lone surrogates, so the record that holds them can
    # be dropped by itself (a strict decode would fail the whole file at that point).
    # strict: a stray quote (`"a"b`) is a bad record, dropped and named, not silently re-joined; and a quote
    # never closed is an error, not one record that swallowed every line after it.
    csv.field_size_limit(1 << 30)
    with open(f, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        header = _csv_record(reader, name, 1)
        if header is None:
            return
        if isinstance(header, RowError) or isinstance(_csv_row(header, header), RowError):
            reason = header if isinstance(header, RowError) else "not valid UTF-8"  # each row would be dropped for it
            raise DataError(f"{name}: the CSV header is not readable ({reason})", field=FIELD)
        _check_header(header, name)
        line = reader.line_num
        while (record := _csv_record(reader, name, line + 1)) is not None:
            start, line = line + 1, reader.line_num
            if isinstance(record, RowError):
                yield start, record
            elif record:  # a blank line is no record (as csv.DictReader reads them)
                yield start, _csv_row(header, record)


def _csv_record(reader: Iterator[list[str]], name: str, start: int) -> list[str] | RowError | None:
    """The next record's fields; RowError for a record the csv module refuses; None at the end of the file."""
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise DataError(f"{name}: a quoted field opened at line {start} is never closed", field=FIELD) from None
        return RowError(f"bad CSV quoting ({str(exc)[:60]})")


def _csv_row(header: list[str], record: list[str]) -> dict | RowError:
    try:
        "".join(record).encode("utf-8")
    except UnicodeEncodeError:
        return RowError("not valid UTF-8")
    if len(record) > len(header):
        return RowError("more fields than the CSV header")
    return dict(zip(header, record + [None] * (len(header) - len(record)), strict=True))  # type: ignore[list-item]


def _check_header(names: list[str], name: str, what: str = "CSV header") -> None:
    """A column named twice would be read as its last occurrence only, silently: refuse the file instead."""
    seen: set[str] = set()
    for column in names:
        if column in seen:
            shown = column.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:80]
            raise DataError(f"{name}: the {what} names column {shown!r} twice", field=FIELD)
        seen.add(column)


def _columnar_rows(f: Path, kind: str, name: str) -> Iterator[dict]:
    import pyarrow as pa

    try:
        for batch in _batches(f, kind):
            _check_header(batch.schema.names, name, f"{kind} schema")
            for start in range(0, batch.num_rows, BATCH_ROWS):
                # a map column as a dict (to_pylist's default is a list of pairs, which no format reads)
                yield from batch.slice(start, BATCH_ROWS).to_pylist(maps_as_pydicts="lossy")
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{name} is not a readable {kind} file ({reason})", field=FIELD) from None


def _batches(f: Path, kind: str) -> Iterator:
    import pyarrow as pa

    if kind == "parquet":
        import pyarrow.parquet as pq

        yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS)
        return
    # Arrow IPC: the random-access file format, or the stream format that `datasets` writes; memory-mapped,
    # so only the batch being converted is paged in.
    with pa.memory_map(str(f)) as source:
        try:
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            source.seek(0)
            yield from pa.ipc.open_stream(source)
            return
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
