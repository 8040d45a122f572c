"""Dataset stage: fetch -> read -> detect format -> normalise -> validate -> subset -> shuffle/split -> write.

Writes `train.jsonl`, `eval.jsonl` and `dataset.json` (source, sha256, counts, rows dropped and why with the
first examples). Rows are {"messages": [...]} for chat formats and {"text": ...} for plain text.

Memory stays bounded whatever the size of the source: rows are streamed from the files, each kept row is
written once as a JSON line to a spool file beside the output, and the shuffle permutes an array of their
offsets (8 bytes a row); the split is then written by copying lines out of the spool in shuffled order.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lora_pipeline.config import DatasetConfig
from lora_pipeline.data import mixing
from lora_pipeline.data.formats import RowError, describe_formats, detect, filled, normalise
from lora_pipeline.data.readers import data_files, read_rows
from lora_pipeline.errors import DataError, LoraPipelineError
from lora_pipeline.files import atomic_dir, hash_file_into, owned_prefix, remove_stale_temp, write_json_atomic
from lora_pipeline.progress import Meter
from lora_pipeline.stages.outputs import DATASET_RECORD, EVAL_ROWS, TRAIN_ROWS

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # first bad rows shown per reason
DETECT_ROWS = 100  # rows of a file looked at to detect its format before it is called unknown
FETCH_PREFIX = "lora-pipeline-fetch-"  # downloads in TMPDIR, removed when the stage ends (or by the next run)


def prepare_dataset(cfg: DatasetConfig, out: Path) -> Path:
    from lora_pipeline import sources

    train_locations, eval_location = mixing.training_locations(cfg), mixing.eval_location(cfg)
    if not train_locations:
        raise DataError("required: a dataset location (or dataset.sources)", field="dataset.data_uri")
    locations = [*train_locations, *filter(None, [eval_location])]
    remove_stale_temp(Path(tempfile.gettempdir()), FETCH_PREFIX)  # a killed run's download, never cleaned
    with atomic_dir(out) as tmp, _Spool(tmp / ".rows.spool") as spool:
        parts = []
        for loc in locations:
            cap = cfg.subset if loc.weight == 1.0 and loc is not eval_location else 0
            sha = cfg.sha256 if loc.option == mixing.URI_FIELD else ""
            limits = sources.Limits(sha256=sha, max_bytes=cfg.max_bytes, timeout=cfg.timeout, deadline=cfg.deadline)
            with mixing.about(loc, len(locations) > 1):
                parts.append(_read_location(loc, cfg, limits, spool, cap))
        train_parts = parts[: len(train_locations)]
        _check_mapping(cfg.columns, set().union(*(p.tally.columns for p in parts)), [n for p in parts for n in p.names])
        for part in parts:
            with mixing.about(part.loc, len(locations) > 1):
                _check_counts(cfg, part.tally, sources.redact(part.loc.uri))
        order, mixed = mixing.mixed_rows([(p.start, p.end) for p in train_parts], [p.loc.weight for p in train_parts],
                                         cfg.seed)  # fmt: skip
        if cfg.subset:
            order = order[: cfg.subset]
        random.Random(cfg.seed).shuffle(order)  # the same permutation as shuffling a list of the rows
        n_train = len(order) if eval_location else _train_size(len(order), cfg.data_split)
        spool.write_lines(order[:n_train], tmp / TRAIN_ROWS)
        if eval_location:
            spool.write_lines(range(parts[-1].start, parts[-1].end), tmp / EVAL_ROWS)
        else:
            spool.write_lines(order[n_train:], tmp / EVAL_ROWS)
        n_eval = parts[-1].end - parts[-1].start if eval_location else len(order) - n_train
        record = _record(cfg, parts, train_parts, mixed, order, n_train, n_eval)
        write_json_atomic(record, tmp / DATASET_RECORD)
    dropped = _Tally(0)
    for part in parts:
        dropped.add(part.tally)
    if dropped.dropped:
        log.warning("dataset: dropped %s", dropped.summary())
    log.info("dataset: %d train rows, %d eval rows -> %s", n_train, n_eval, out)
    return out


@dataclass
class _Part:
    """One location read into the spool: its rows are spool indices [start, end)."""

    loc: mixing.Location
    names: list[str]
    formats: dict[str, str | None]
    sha256: str
    tally: _Tally
    start: int
    end: int


def _read_location(loc: mixing.Location, cfg: DatasetConfig, limits: object, spool: _Spool, cap: int) -> _Part:
    """Fetch, read and validate one location (the same code for data_uri, each source and eval_uri)."""
    from lora_pipeline import sources

    shown = sources.redact(loc.uri)
    with (
        tempfile.TemporaryDirectory(prefix=owned_prefix(FETCH_PREFIX)) as download_dir,
        _named_as_source(download_dir, shown),
    ):
        path = sources.fetch(loc.uri, Path(download_dir), limits)  # type: ignore[arg-type]
        files = data_files(path, shown)
        names = [_label(f, path) for f in files]
        tally, start = _Tally(cap), len(spool)
        formats = {name: _read_file(f, name, cfg, spool, tally) for f, name in zip(files, names, strict=True)}
        return _Part(loc, names, formats, _sha256(files), tally, start, len(spool))


def _record(
    cfg: DatasetConfig, parts: list[_Part], train_parts: list[_Part], mixed: list[int], order: array, n_train: int,
    n_eval: int,
) -> dict:  # fmt: skip
    """dataset.json: the spec's fields over the training locations, then each location's own counts."""
    from lora_pipeline import sources

    used = _rows_per_part(train_parts, order)
    trained = _rows_per_part(train_parts, order[:n_train])
    dropped = _Tally(0)
    for part in train_parts:  # the rows rows_read counts: rows_read = rows_valid + the dropped (eval_uri has its own)
        dropped.add(part.tally)
    one = len(train_parts) == 1
    record = {
        "source": ", ".join(sources.redact(p.loc.uri) for p in train_parts),  # data_uri alone: as it was
        "files": [n for p in train_parts for n in p.names],
        "formats": {k: v for p in train_parts for k, v in p.formats.items()},
        # several sources: the sha256 of their sha256s, in order
        "sha256": train_parts[0].sha256 if one else hashlib.sha256("".join(
            p.sha256 for p in train_parts).encode()).hexdigest(),
        "rows_read": sum(p.tally.read for p in train_parts),  # before `subset`
        "rows_valid": sum(p.tally.valid for p in train_parts),
        "rows_used": len(order),
        "train_rows": n_train,
        "eval_rows": n_eval,
        "dropped": _dropped(dropped),
        "config": {
            "data_split": None if cfg.eval_uri else cfg.data_split,
            "subset": cfg.subset,
            "seed": cfg.seed,
            "format": cfg.format,
            "columns": cfg.columns,
            "max_bad_rows": cfg.max_bad_rows,
        },
    }  # fmt: skip
    if not mixing.is_plain(cfg):
        record["sources"] = [
            {**_counts(p), "weight": p.loc.weight, "rows_mixed": m, "rows_used": u, "train_rows": t, "eval_rows": u - t}
            for p, m, u, t in zip(train_parts, mixed, used, trained, strict=True)
        ]
    if cfg.eval_uri:
        record["eval_source"] = {**_counts(parts[-1]), "eval_rows": n_eval}
    return record


def _counts(part: _Part) -> dict:
    from lora_pipeline import sources

    t = part.tally
    return {
        "option": part.loc.option,
        "uri": sources.redact(part.loc.uri),
        "files": part.names,
        "sha256": part.sha256,
        "rows_read": t.read,
        "rows_valid": t.valid,
        "rows_dropped": t.read - t.valid,
        "dropped": _dropped(t),
    }


def _dropped(tally: _Tally) -> dict:
    return {r: {"count": n, "first_rows": tally.first[r]} for r, n in tally.dropped.items()}


def _rows_per_part(parts: list[_Part], indices: Iterable[int]) -> list[int]:
    starts = [p.start for p in parts]
    counts = [0] * len(parts)
    for i in indices:
        counts[bisect.bisect_right(starts, i) - 1] += 1
    return counts


def _train_size(n: int, split: float) -> int:
    n_train = n if split >= 1.0 else max(1, round(n * split))
    if split < 1.0 and n_train == n and n > 1:
        n_train -= 1  # keep at least one eval row when a split was asked for
    return n_train


class _Tally:
    """Rows read, kept and dropped (count and first row names per reason): O(reasons) memory, not O(rows)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # rows of this location kept in the spool (0 = all): `subset` for a source of weight 1
        self.read = self.valid = 0
        self.dropped: dict[str, int] = {}
        self.first: dict[str, list[str]] = {}
        self.columns: set[str] = set()  # every column name seen in an object row: O(columns) memory

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.first.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def add(self, other: _Tally) -> None:
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
            self.first.setdefault(reason, []).extend(other.first[reason])
            del self.first[reason][MAX_EXAMPLES:]

    def summary(self) -> str:
        return "; ".join(f"{n} rows: {r} (first: {self.first[r][0]})" for r, n in self.dropped.items()) or "empty"


def _read_file(f: Path, name: str, cfg: DatasetConfig, spool: _Spool, tally: _Tally) -> str | None:
    """Read one file into the spool; returns the format its rows were read as (None: no row to tell)."""
    rows = read_rows(f, name)
    head: list[tuple[int, object]] = []
    fmt = None if cfg.format == "auto" else cfg.format
    if fmt is None:  # the first object rows tell the format; they are read again below
        for item in rows:
            head.append(item)
            if isinstance(item[1], dict) and (fmt := detect(filled(item[1]), cfg.columns)):
                break
            if sum(isinstance(r, dict) for _, r in head) >= DETECT_ROWS:
                break
        # no row with its fields filled: the columns alone tell it (the rows are then dropped as empty, by name)
        fmt = fmt or next((f for _, r in head if isinstance(r, dict) and (f := detect(r, cfg.columns))), None)
        if fmt is None and (seen := [r for _, r in head if isinstance(r, dict)]):
            columns = ", ".join(dict.fromkeys(k for r in seen for k in r)) or "(none)"
            raise DataError(
                f"{name}: unknown row layout (columns: {columns}); known formats: {describe_formats()}; "
                "map yours with --dataset.columns, e.g. instruction=question,output=answer",
                field="dataset.columns",
            )
    meter = Meter(log, f"dataset: {name}", "rows")
    for i, raw in _chain(head, rows):
        tally.read += 1
        meter.update()
        if isinstance(raw, dict):
            tally.columns.update(raw)
        try:
            if isinstance(raw, RowError):
                raise raw
            row = normalise(raw, fmt or "messages", cfg.columns)
        except RowError as exc:
            tally.drop(str(exc), f"{name}:{i}")
            continue
        tally.valid += 1
        if not tally.cap or tally.valid <= tally.cap:
            spool.add(row)
    meter.close()
    return fmt


def _check_mapping(mapping: dict, columns: set[str], names: list[str]) -> None:
    """A `dataset.columns` entry whose column no row has would be ignored without a word: a typo, refused."""
    for field, column in mapping.items():
        if column not in columns:
            shown = ", ".join(sorted(columns)[:20]) or "(none)"
            raise DataError(
                f"{field}={column}: no column {column!r} in {', '.join(names[:3])} (columns: {shown})",
                field="dataset.columns",
            )


def _chain(head: list, rest: Iterable) -> Iterable:
    yield from head
    yield from rest


def _check_counts(cfg: DatasetConfig, tally: _Tally, source: str) -> None:
    if not tally.valid:
        raise DataError(f"no usable row in {source} ({tally.summary()})", field="dataset")
    bad = tally.read - tally.valid
    if bad / tally.read > cfg.max_bad_rows:
        raise DataError(
            f"{bad} of {tally.read} rows are bad ({bad / tally.read:.1%}, more than dataset.max_bad_rows = "
            f"{cfg.max_bad_rows:.1%}): {tally.summary()}",
            field="dataset",
        )


class _Spool:
    """Kept rows as JSON lines in one file, with the offset of each line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offsets = array("q", [0])
        self.fh = open(path, "wb")  # noqa: SIM115 - closed by __exit__

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def add(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        self.fh.write(line)
        self.offsets.append(self.offsets[-1] + len(line))

    def write_lines(self, order: Iterable[int], dest: Path) -> None:
        self.fh.flush()
        with open(dest, "wb") as out:
            if self.offsets[-1] == 0:
                return
            # pread, not mmap: pages of a mapped spool would count in the process's RSS until unmapped.
            with open(self.path, "rb") as fh:
                fd, offsets = fh.fileno(), self.offsets
                for i in order:
                    out.write(os.pread(fd, offsets[i + 1] - offsets[i], offsets[i]))


@contextlib.contextmanager
def _named_as_source(folder: str, source: str) -> Iterator[None]:
    """An error names the source the user gave (an archive, a URI), never the temporary folder it was fetched
    into, which is gone by the time the line is read."""
    try:
        yield
    except LoraPipelineError as exc:
        exc.args = tuple(a.replace(folder, source) if isinstance(a, str) else a for a in exc.args)
        raise


def _label(f: Path, root: Path) -> str:
    """How rows of `f` are named in dataset.json: its path inside a directory source, else its name."""
    if root.is_dir():
        try:
            return f.relative_to(root).as_posix()
        except ValueError:  # a file a source linked in from elsewhere (the HF cache)
            return f.name
    return f.name


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        hash_file_into(digest, f)
    return digest.hexdigest()
