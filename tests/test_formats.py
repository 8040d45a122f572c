"""Row formats and file types through the dataset stage: every layout ends as the same chat rows (or text
rows), per-row reasons for bad rows, one line for unknown layouts and for too many bad rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from lora_pipeline.config import Config, DatasetConfig, validate
from lora_pipeline.data.formats import FORMATS, RowError, normalise
from lora_pipeline.errors import ConfigError, DataError
from lora_pipeline.files import read_json, read_jsonl
from lora_pipeline.stages.dataset import prepare_dataset

CHAT = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]


def _run(tmp_path: Path, uri: Path | str, **options: object) -> tuple[list[dict], dict]:
    cfg = DatasetConfig(data_uri=str(uri), data_split=1.0, **options)
    out = prepare_dataset(cfg, tmp_path / "ds")
    return read_jsonl(out / "train.jsonl"), read_json(out / "dataset.json")


# --- one row of each format ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "row", "expected"),
    [
        ("messages", {"messages": CHAT}, CHAT),
        (
            "messages",  # OpenAI content parts
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "text", "text": "1"}]},
                    {"role": "assistant", "content": "A1"},
                ]
            },  # fmt: skip
            CHAT,
        ),
        (
            "sharegpt",
            {
                "conversations": [
                    {"from": "system", "value": "S"},
                    {"from": "human", "value": "Q1"},
                    {"from": "gpt", "value": "A1"},
                ]
            },  # fmt: skip
            [{"role": "system", "content": "S"}, *CHAT],
        ),
        ("alpaca", {"instruction": "Q1", "input": "", "output": "A1"}, CHAT),
        (
            "alpaca",
            {"instruction": "Sum", "input": "1 2", "output": "3", "system": "S"},
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Sum\n\n1 2"},
                {"role": "assistant", "content": "3"},
            ],  # fmt: skip
        ),
        ("prompt_completion", {"prompt": "Q1", "completion": "A1"}, CHAT),
        ("prompt_completion", {"prompt": CHAT[:1], "completion": CHAT[1:]}, CHAT),
    ],
)
def test_each_format_becomes_chat_messages(fmt: str, row: dict, expected: list[dict]) -> None:
    assert normalise(row, fmt) == {"messages": expected}


@pytest.mark.parametrize(
    ("fmt", "row", "reason"),
    [
        ("alpaca", {"instruction": "Q"}, "missing field 'output'"),
        ("alpaca", {"instruction": "Q", "output": " "}, "empty assistant turn"),
        (
            "sharegpt",
            {"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
            "roles out of order",
        ),  # fmt: skip
        ("sharegpt", {"conversations": [{"from": "robot", "value": "A"}]}, "unknown role 'robot'"),
        ("prompt_completion", {"prompt": "Q", "completion": 3}, "completion is not a non-empty list"),
        ("text", {"text": "  "}, "empty text"),
        ("text", {"text": 1}, "text is not a string"),
    ],
)
def test_bad_rows_have_a_reason(fmt: str, row: dict, reason: str) -> None:
    with pytest.raises(RowError, match=f"^{reason}$"):
        normalise(row, fmt)


# --- files ------------------------------------------------------------------------------------------------

ALPACA = [{"instruction": f"Q{i}", "input": "", "output": f"A{i}"} for i in range(10)]


def _chat(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]


def _write(path: Path, rows: list[dict]) -> Path:
    """rows as the file type that `path`'s suffix names."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps({"data": rows}))
    elif path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # several row groups
    elif path.suffix == ".arrow":
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(rows).schema) as w:
            w.write_table(pa.Table.from_pylist(rows), max_chunksize=4)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".arrow"])
def test_alpaca_rows_in_every_file_type(suffix: str, tmp_path: Path) -> None:
    train, meta = _run(tmp_path, _write(tmp_path / f"a{suffix}", ALPACA))
    assert sorted(json.dumps(r) for r in train) == sorted(json.dumps({"messages": _chat(i)}) for i in range(10))
    assert meta["formats"] == {f"a{suffix}": "alpaca"} and meta["rows_used"] == 10


def test_chat_messages_in_parquet_and_csv(tmp_path: Path) -> None:
    rows = [{"messages": _chat(i)} for i in range(4)]
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "a.parquet", rows)
    _write(tmp_path / "d" / "b.csv", [{"messages": json.dumps(r["messages"])} for r in rows])  # lists as JSON text
    train, meta = _run(tmp_path, tmp_path / "d")
    assert len(train) == 8 and all(r in train for r in rows)
    assert meta["formats"] == {"a.parquet": "messages", "b.csv": "messages"}


def test_arrow_stream_and_save_to_disk_directory(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ALPACA[:6]), "test": datasets.Dataset.from_list(ALPACA[6:])}
    ).save_to_disk(str(tmp_path / "saved"))
    train, meta = _run(tmp_path, tmp_path / "saved")
    assert meta["rows_used"] == 6  # the train split only; the JSON metadata files are not rows
    assert all(f.endswith(".arrow") for f in meta["files"])
    assert {r["messages"][0]["content"] for r in train} == {f"Q{i}" for i in range(6)}


def test_plain_text_rows_are_written_as_text(tmp_path: Path) -> None:
    train, meta = _run(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": f"Doc {i}."} for i in range(3)]))
    assert sorted(train, key=str) == [{"text": "Doc 0."}, {"text": "Doc 1."}, {"text": "Doc 2."}]
    assert meta["formats"] == {"t.jsonl": "text"}


def test_column_mapping_reads_an_unknown_layout(tmp_path: Path) -> None:
    rows = [{"question": f"Q{i}", "answer": f"A{i}", "id": i} for i in range(5)]
    path = _write(tmp_path / "qa.csv", rows)
    train, meta = _run(tmp_path, path, columns={"instruction": "question", "output": "answer"})
    assert sorted(json.dumps(r) for r in train) == sorted(json.dumps({"messages": _chat(i)}) for i in range(5))
    assert meta["formats"] == {"qa.csv": "alpaca"}


def test_unknown_layout_without_mapping_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "qa.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(DataError) as err:
        _run(tmp_path, path)
    message = str(err.value)
    assert message.startswith("dataset.columns: qa.jsonl: unknown row layout (columns: question, answer)")
    assert "alpaca (instruction, output" in message and "sharegpt (conversations)" in message
    assert "\n" not in message and not (tmp_path / "ds").exists()


def test_columns_option_names_exactly_the_formats_fields() -> None:
    config = Config(dataset=DatasetConfig(columns={"questoin": "q"}))
    with pytest.raises(ConfigError, match="expected one of") as err:
        validate(config)
    named = str(err.value).split("expected one of ", 1)[1].rstrip(")").split(", ")
    assert set(named) == {f for required, optional in FORMATS.values() for f in (*required, *optional)}


def test_format_option_overrides_detection(tmp_path: Path) -> None:
    # Rows with both fields: detection says messages (first in order), the option says text.
    rows = [{"messages": _chat(i), "text": f"Doc {i}"} for i in range(3)]
    train, meta = _run(tmp_path, write_jsonl(tmp_path / "both.jsonl", rows), format="text")
    assert sorted(r["text"] for r in train) == ["Doc 0", "Doc 1", "Doc 2"]
    assert meta["formats"] == {"both.jsonl": "text"}


def test_rows_missing_a_field_are_counted_after_detection(tmp_path: Path) -> None:
    rows = [*ALPACA[:9], {"instruction": "Q"}]  # 1 bad row in 10: at the default 10% limit
    _, meta = _run(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows))
    assert meta["dropped"] == {"missing field 'output'": {"count": 1, "first_rows": ["a.jsonl:10"]}}


def test_too_many_bad_rows_is_one_line(tmp_path: Path) -> None:
    rows = [*ALPACA[:8], "{not json", {"instruction": "Q"}]  # 2 bad rows in 10
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(DataError) as err:
        _run(tmp_path, path)
    assert str(err.value) == (
        "dataset: 2 of 10 rows are bad (20.0%, more than dataset.max_bad_rows = 10.0%): "
        "1 rows: not valid JSON (first: a.jsonl:9); 1 rows: missing field 'output' (first: a.jsonl:10)"
    )
    _, meta = _run(tmp_path, path, max_bad_rows=0.2)
    assert meta["rows_used"] == 8


def test_csv_record_that_is_not_utf8_is_a_counted_drop(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", ALPACA)
    data = path.read_bytes().replace(b"Q3", "Q\xe9".encode("latin-1"))
    path.write_bytes(data)
    _, meta = _run(tmp_path, path, max_bad_rows=0.5)
    assert meta["dropped"] == {"not valid UTF-8": {"count": 1, "first_rows": ["a.csv:5"]}}  # header is line 1
    assert meta["rows_used"] == 9


def test_corrupt_parquet_is_one_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.parquet", ALPACA)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"^dataset.data_uri: a.parquet is not a readable parquet file \("):
        _run(tmp_path, path)
