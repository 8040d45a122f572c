"""s3:// sources against moto's S3 server on loopback: one object, a prefix of several files, fingerprints
from ETags, wrong credentials, a missing bucket; and a base model fetched from a prefix into a cache."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_ROWS
from lora_pipeline import sources
from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import SourceError
from lora_pipeline.files import read_json, read_jsonl
from lora_pipeline.stages.dataset import prepare_dataset

moto_server = pytest.importorskip("moto.server")

SECRET = "not-a-real-secret-key-but-secret"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):  # noqa: ANN201 - a boto3 client
    """A fresh bucket on the server, and the environment a user would set for it."""
    import boto3

    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE01",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),  # the machine's own ~/.aws stays out of the test
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    client = boto3.client("s3")
    client.create_bucket(Bucket=f"b-{tmp_path.name.lower().replace('_', '-')[:40]}")
    client.bucket = client.list_buckets()["Buckets"][-1]["Name"]  # type: ignore[attr-defined]
    return client


def _put(s3, key: str, rows: list) -> None:  # noqa: ANN001
    s3.put_object(Bucket=s3.bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.mark.integration
def test_one_object(s3, tmp_path: Path) -> None:  # noqa: ANN001
    _put(s3, "data/chat.jsonl", CHAT_ROWS)
    uri = f"s3://{s3.bucket}/data/chat.jsonl"
    out = prepare_dataset(DatasetConfig(data_uri=uri), tmp_path / "ds")
    meta = read_json(out / "dataset.json")
    assert meta["source"] == uri and meta["files"] == ["chat.jsonl"] and meta["rows_used"] == 40

    first = sources.fingerprint(uri)
    assert first.startswith('etag:"') and sources.fingerprint(uri) == first
    _put(s3, "data/chat.jsonl", CHAT_ROWS[:39])
    assert sources.fingerprint(uri) != first


@pytest.mark.integration
def test_a_prefix_of_several_files(s3, tmp_path: Path) -> None:  # noqa: ANN001
    _put(s3, "sets/v1/a.jsonl", CHAT_ROWS[:10])
    _put(s3, "sets/v1/sub/b.jsonl", CHAT_ROWS[10:25])
    _put(s3, "sets/v10/c.jsonl", CHAT_ROWS[25:])  # shares the text prefix "sets/v1" but not the folder
    s3.put_object(Bucket=s3.bucket, Key="sets/v1/", Body=b"")  # a console's folder marker
    for uri in (f"s3://{s3.bucket}/sets/v1/", f"s3://{s3.bucket}/sets/v1"):
        out = prepare_dataset(DatasetConfig(data_uri=uri, data_split=1.0), tmp_path / "ds")
        meta = read_json(out / "dataset.json")
        assert meta["files"] == ["a.jsonl", "sub/b.jsonl"] and meta["rows_used"] == 25
        assert len(read_jsonl(out / "train.jsonl")) == 25

    uri = f"s3://{s3.bucket}/sets/v1/"
    first = sources.fingerprint(uri)
    assert first.startswith("s3-tree:") and sources.fingerprint(uri) == first
    _put(s3, "sets/v1/sub/b.jsonl", CHAT_ROWS[10:24])
    assert sources.fingerprint(uri) != first


@pytest.mark.integration
def test_wrong_credentials_are_one_clear_line(
    s3,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,  # noqa: ANN001
) -> None:
    _put(s3, "x.jsonl", CHAT_ROWS[:2])
    monkeypatch.setattr("moto.settings.INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks keys
    caplog.set_level(logging.DEBUG, logger="lora_pipeline")
    with pytest.raises(SourceError) as err:
        sources.fingerprint(f"s3://{s3.bucket}/x.jsonl")
    message = str(err.value)
    assert message.startswith(f"dataset.data_uri: access denied: s3://{s3.bucket}/x.jsonl (")
    assert "\n" not in message and SECRET not in message and SECRET not in caplog.text


@pytest.mark.integration
def test_missing_bucket_and_missing_key(s3) -> None:  # noqa: ANN001
    with pytest.raises(SourceError, match=r"^dataset.data_uri: no such bucket: s3://no-such-bucket/x.jsonl \("):
        sources.fingerprint("s3://no-such-bucket/x.jsonl")
    with pytest.raises(SourceError, match="not found: .*no object with this key, nor under this prefix"):
        sources.fingerprint(f"s3://{s3.bucket}/none.jsonl")


@pytest.mark.integration
def test_size_cap_is_checked_before_downloading(s3, tmp_path: Path) -> None:  # noqa: ANN001
    _put(s3, "big/a.jsonl", CHAT_ROWS)
    with pytest.raises(SourceError, match="more than dataset.max_bytes"):
        sources.fetch(f"s3://{s3.bucket}/big/", tmp_path, sources.Limits(max_bytes=100))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_model_prefix_is_cached_by_etags(s3, tmp_path: Path) -> None:  # noqa: ANN001
    for name, body in (("config.json", b'{"model_type": "qwen2"}'), ("model.safetensors", b"w" * 100)):
        s3.put_object(Bucket=s3.bucket, Key=f"models/m1/{name}", Body=body)
    uri = f"s3://{s3.bucket}/models/m1/"
    first = sources.model_fingerprint(uri)
    path = sources.fetch_model(uri, tmp_path / "cache")
    assert sorted(p.name for p in path.iterdir()) == [".complete", "config.json", "model.safetensors"]
    (path / "config.json").write_text("marked")  # a second call with the same ETags downloads nothing
    assert sources.fetch_model(uri, tmp_path / "cache") == path and (path / "config.json").read_text() == "marked"

    s3.put_object(Bucket=s3.bucket, Key="models/m1/model.safetensors", Body=b"v" * 100)  # a new version
    new = sources.fetch_model(uri, tmp_path / "cache")
    assert new != path and (new / "model.safetensors").read_bytes() == b"v" * 100
    assert sources.model_fingerprint(uri) != first
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == []


@pytest.mark.integration
def test_missing_model_prefix_names_the_model_option(s3, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(SourceError, match=r"^train.model: not found: s3://.*/models/none/"):
        sources.model_fingerprint(f"s3://{s3.bucket}/models/none/")
    with pytest.raises(SourceError, match=r"^train.model: not found: "):
        sources.fetch_model(f"s3://{s3.bucket}/models/none/", tmp_path / "cache")


@pytest.mark.integration
def test_download_logs_progress_and_keeps_its_deadline(
    s3, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    _put(s3, "big/data.jsonl", CHAT_ROWS * 50)
    uri = f"s3://{s3.bucket}/big/data.jsonl"
    # Meter(..., total=None, every_seconds=10.0): a line per update, not one every 10 s, for a small file.
    monkeypatch.setattr("lora_pipeline.progress.Meter.__init__.__defaults__", (None, 0.0))
    caplog.set_level(logging.INFO, logger="lora_pipeline.sources.s3")
    sources.fetch(uri, tmp_path / "a")
    assert any(f"download {uri}: " in r.getMessage() and " B/s)" in r.getMessage() for r in caplog.records)
    with pytest.raises(SourceError, match=r"gave up: .*dataset.deadline"):
        sources.fetch(uri, tmp_path / "b", sources.Limits(deadline=1e-6))
