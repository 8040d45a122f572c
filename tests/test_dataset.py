"""Dataset stage: local and https sources, split/subset, bad rows counted by reason, atomic output."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, write_jsonl
from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import DataError, SourceError
from lora_pipeline.files import read_json, read_jsonl
from lora_pipeline.sources import redact
from lora_pipeline.stages.dataset import prepare_dataset


def test_split_and_counts(chat_file: Path, tmp_path: Path) -> None:
    out = prepare_dataset(DatasetConfig(data_uri=str(chat_file), data_split=0.75), tmp_path / "ds")
    train, evaluation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert (len(train), len(evaluation)) == (30, 10)
    assert sorted(json.dumps(r) for r in train + evaluation) == sorted(json.dumps(r) for r in CHAT_ROWS)
    meta = read_json(out / "dataset.json")
    assert meta["train_rows"] == 30 and meta["eval_rows"] == 10 and len(meta["sha256"]) == 64


def test_no_split_and_subset_first_n(chat_file: Path, tmp_path: Path) -> None:
    out = prepare_dataset(DatasetConfig(data_uri=str(chat_file), data_split=1.0, subset=5), tmp_path / "ds")
    train = read_jsonl(out / "train.jsonl")
    assert read_jsonl(out / "eval.jsonl") == []
    assert sorted(r["messages"][0]["content"] for r in train) == sorted(
        r["messages"][0]["content"] for r in CHAT_ROWS[:5]
    )


def test_shuffle_follows_seed(chat_file: Path, tmp_path: Path) -> None:
    a = read_jsonl(prepare_dataset(DatasetConfig(data_uri=str(chat_file), seed=1), tmp_path / "a") / "train.jsonl")
    b = read_jsonl(prepare_dataset(DatasetConfig(data_uri=str(chat_file), seed=1), tmp_path / "b") / "train.jsonl")
    c = read_jsonl(prepare_dataset(DatasetConfig(data_uri=str(chat_file), seed=2), tmp_path / "c") / "train.jsonl")
    assert a == b and a != c


def test_bad_rows_are_counted_by_reason_with_row_numbers(tmp_path: Path) -> None:
    rows = [
        *CHAT_ROWS[:3],
        "{not json",
        {"text": "no messages"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "robot", "content": "a"}]},
    ]
    out = prepare_dataset(DatasetConfig(data_uri=str(write_jsonl(tmp_path / "d.jsonl", rows))), tmp_path / "ds")
    dropped = read_json(out / "dataset.json")["dropped"]
    assert dropped["not valid JSON"]["first_rows"] == ["d.jsonl:4"]
    assert dropped["unknown row format (expected one of: messages)"]["first_rows"] == ["d.jsonl:5"]
    assert dropped["last turn is not the assistant's"]["first_rows"] == ["d.jsonl:6"]
    assert dropped["empty assistant turn"]["first_rows"] == ["d.jsonl:7"]
    assert dropped["roles out of order"]["first_rows"] == ["d.jsonl:8"]
    assert dropped["unknown role 'robot'"]["count"] == 1
    assert read_json(out / "dataset.json")["rows_used"] == 3


def test_no_usable_row_fails_and_keeps_previous_output(chat_file: Path, tmp_path: Path) -> None:
    out = prepare_dataset(DatasetConfig(data_uri=str(chat_file)), tmp_path / "ds")
    before = (out / "train.jsonl").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"x": 1}])
    with pytest.raises(DataError, match="no usable row"):
        prepare_dataset(DatasetConfig(data_uri=str(bad)), out)
    assert (out / "train.jsonl").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left behind


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": CHAT_ROWS[:4]}))
    out = prepare_dataset(DatasetConfig(data_uri=f"file://{path}", data_split=1.0), tmp_path / "ds")
    assert len(read_jsonl(out / "train.jsonl")) == 4


def test_unsupported_scheme_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        prepare_dataset(DatasetConfig(data_uri="ftp://host/data.jsonl"), tmp_path / "ds")
    assert err.value.field == "dataset.data_uri"
    assert not (tmp_path / "ds").exists()


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    failures_left = 0

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/missing"):
            self.send_error(404)
            return
        if type(self).failures_left > 0:
            type(self).failures_left -= 1
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server(chat_file: Path) -> Iterator[str]:
    _Handler.body = chat_file.read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_source_retries_server_errors(http_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)
    _Handler.failures_left = 2  # 500, 500, then 200
    out = prepare_dataset(DatasetConfig(data_uri=f"{http_server}/data/chat.jsonl"), tmp_path / "ds")
    meta = read_json(out / "dataset.json")
    assert meta["rows_used"] == 40 and meta["files"] == ["chat.jsonl"]


def test_http_404_is_not_retried_and_names_the_field(http_server: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="HTTP 404") as err:
        prepare_dataset(DatasetConfig(data_uri=f"{http_server}/missing.jsonl"), tmp_path / "ds")
    assert err.value.field == "dataset.data_uri"


def test_unreachable_host_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)
    with pytest.raises(SourceError, match="cannot download"):
        prepare_dataset(DatasetConfig(data_uri="http://127.0.0.1:9/data.jsonl"), tmp_path / "ds")


def test_credentials_and_signed_queries_are_redacted() -> None:
    assert redact("https://user:secret@host/x.jsonl?X-Amz-Signature=abc") == "https://host/x.jsonl?<redacted>"
    assert redact("/local/path.jsonl") == "/local/path.jsonl"


def test_source_is_stored_redacted(http_server: str, tmp_path: Path) -> None:
    uri = http_server.replace("http://", "http://user:hunter2@") + "/data/chat.jsonl?token=hunter2"
    out = prepare_dataset(DatasetConfig(data_uri=uri), tmp_path / "ds")
    assert "hunter2" not in (out / "dataset.json").read_text()
