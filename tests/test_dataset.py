"""Dataset stage: local and https sources, split/subset, bad rows counted by reason, atomic output."""

from __future__ import annotations

import base64
import codecs
import http.server
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, write_jsonl
from helpers import base_url, loopback_server
from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import DataError, SourceError
from lora_pipeline.files import read_json, read_jsonl
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
    uri = str(write_jsonl(tmp_path / "d.jsonl", rows))
    out = prepare_dataset(DatasetConfig(data_uri=uri, max_bad_rows=1.0), tmp_path / "ds")
    dropped = read_json(out / "dataset.json")["dropped"]
    assert dropped["not valid JSON"]["first_rows"] == ["d.jsonl:4"]
    assert dropped["missing field 'messages'"]["first_rows"] == ["d.jsonl:5"]
    assert dropped["last turn is not the assistant's"]["first_rows"] == ["d.jsonl:6"]
    assert dropped["empty assistant turn"]["first_rows"] == ["d.jsonl:7"]
    assert dropped["roles out of order"]["first_rows"] == ["d.jsonl:8"]
    assert dropped["unknown role 'robot'"]["count"] == 1
    assert read_json(out / "dataset.json")["rows_used"] == 3


def test_no_usable_row_fails_and_keeps_previous_output(chat_file: Path, tmp_path: Path) -> None:
    out = prepare_dataset(DatasetConfig(data_uri=str(chat_file)), tmp_path / "ds")
    before = (out / "train.jsonl").read_text()
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"messages": []}])
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


def free_port() -> int:
    """A loopback port that nothing listens on (just released), so connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(http.server.BaseHTTPRequestHandler):
    body = b""
    failures_left = 0
    seen: list[tuple[str, str | None]] = []  # (path with query, Authorization header) of each request

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
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
    _Handler.body, _Handler.failures_left, _Handler.seen = chat_file.read_bytes(), 0, []
    with loopback_server(_Handler) as server:
        yield base_url(server)


@pytest.mark.integration
def test_https_source_retries_server_errors(http_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)
    _Handler.failures_left = 2  # 500, 500, then 200
    out = prepare_dataset(DatasetConfig(data_uri=f"{http_server}/data/chat.jsonl"), tmp_path / "ds")
    meta = read_json(out / "dataset.json")
    assert meta["rows_used"] == 40 and meta["files"] == ["chat.jsonl"]


@pytest.mark.integration
def test_http_404_is_not_retried_and_names_the_field(http_server: str, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="HTTP 404") as err:
        prepare_dataset(DatasetConfig(data_uri=f"{http_server}/missing.jsonl"), tmp_path / "ds")
    assert err.value.field == "dataset.data_uri"


def test_unreachable_host_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)
    with pytest.raises(SourceError, match="cannot connect: .*connection refused"):
        prepare_dataset(DatasetConfig(data_uri=f"http://127.0.0.1:{free_port()}/data.jsonl"), tmp_path / "ds")


def _secret_uri(server: str) -> str:
    return server.replace("http://", "http://user:secretpw@") + "/x.jsonl?sig=SECRETTOKEN"


def _assert_no_secrets(root: Path, *texts: str) -> None:
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert b"secretpw" not in data and b"SECRETTOKEN" not in data, path
    for text in texts:
        assert "secretpw" not in text and "SECRETTOKEN" not in text, text


@pytest.mark.integration
def test_credentials_are_used_but_never_stored_or_logged(
    http_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)
    caplog.set_level(logging.DEBUG)
    _Handler.failures_left = 1  # one retry warning, which names the URI
    out = prepare_dataset(DatasetConfig(data_uri=_secret_uri(http_server)), tmp_path / "ds")

    # The secrets did reach the server: the query as sent, the password as Basic auth.
    assert _Handler.seen[-1] == ("/x.jsonl?sig=SECRETTOKEN", "Basic " + base64.b64encode(b"user:secretpw").decode())
    assert read_json(out / "dataset.json")["source"] == f"http://<redacted>@{http_server[7:]}/x.jsonl?<redacted>"
    assert "retry 1/2: http://<redacted>@" in caplog.text
    _assert_no_secrets(tmp_path, caplog.text)


@pytest.mark.integration
def test_credentials_stay_out_of_a_failed_download(
    http_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)
    caplog.set_level(logging.DEBUG)
    _Handler.failures_left = 10  # 500 on every attempt
    with pytest.raises(SourceError, match="server error: .*HTTP 500; 3 attempts") as err:
        prepare_dataset(DatasetConfig(data_uri=_secret_uri(http_server)), tmp_path / "ds")

    assert len(_Handler.seen) == 3 and caplog.text.count("retry") == 2
    assert "<redacted>" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ds").exists()
    _assert_no_secrets(tmp_path, caplog.text, str(err.value))


def test_utf8_bom_keeps_the_first_row(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + write_jsonl(tmp_path / "plain.jsonl", CHAT_ROWS[:4]).read_bytes())
    meta = read_json(prepare_dataset(DatasetConfig(data_uri=str(path)), tmp_path / "ds") / "dataset.json")
    assert meta["rows_used"] == 4 and meta["dropped"] == {}


def test_json_file_with_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(CHAT_ROWS[:4]).encode())
    out = prepare_dataset(DatasetConfig(data_uri=str(path), data_split=1.0), tmp_path / "ds")
    assert len(read_jsonl(out / "train.jsonl")) == 4


def test_jsonl_line_that_is_not_utf8_is_a_counted_drop(tmp_path: Path) -> None:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in CHAT_ROWS[:3]]
    # Latin-1 "café": valid JSON if decoded with replacement characters, which must not happen.
    lines[1] = lines[1].replace(b"plus", "café".encode("latin-1"))
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    out = prepare_dataset(DatasetConfig(data_uri=str(path), data_split=1.0, max_bad_rows=0.5), tmp_path / "ds")
    meta = read_json(out / "dataset.json")
    assert meta["dropped"] == {"not valid UTF-8": {"count": 1, "first_rows": ["mixed.jsonl:2"]}}
    assert meta["rows_read"] == 3 and meta["rows_used"] == 2
    assert "\ufffd" not in (out / "train.jsonl").read_text(encoding="utf-8")


def test_json_file_that_is_not_utf8_is_one_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes(json.dumps(CHAT_ROWS[:3], indent=1).replace("plus", "café").encode("latin-1"))
    with pytest.raises(DataError) as err:
        prepare_dataset(DatasetConfig(data_uri=str(path)), tmp_path / "ds")
    assert str(err.value) == "dataset.data_uri: rows.json is not valid UTF-8 (line 6)"
    assert path.read_bytes().split(b"\n")[5].count(b"\xe9") == 1  # line 6 is indeed where the first é is


def test_directory_source_names_rows_by_relative_path(tmp_path: Path) -> None:
    for sub in ("a", "b"):
        (tmp_path / "src" / sub).mkdir(parents=True)
    write_jsonl(tmp_path / "src" / "a" / "part.jsonl", CHAT_ROWS[:2])
    write_jsonl(tmp_path / "src" / "b" / "part.jsonl", [CHAT_ROWS[2], "{x"])
    (tmp_path / "src" / "README.md").write_text("not data")
    cfg = DatasetConfig(data_uri=str(tmp_path / "src"), max_bad_rows=0.5)
    meta = read_json(prepare_dataset(cfg, tmp_path / "ds") / "dataset.json")
    assert meta["files"] == ["a/part.jsonl", "b/part.jsonl"]
    assert meta["dropped"]["not valid JSON"]["first_rows"] == ["b/part.jsonl:2"]


def test_subset_does_not_change_rows_read(chat_file: Path, tmp_path: Path) -> None:
    meta = read_json(
        prepare_dataset(DatasetConfig(data_uri=str(chat_file), subset=5), tmp_path / "ds") / "dataset.json"
    )
    assert (meta["rows_read"], meta["rows_valid"], meta["rows_used"]) == (40, 40, 5)
