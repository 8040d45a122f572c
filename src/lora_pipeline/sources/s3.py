"""s3://bucket/key (one object) and s3://bucket/prefix/ (every object under it) through boto3.

boto3 reads the credentials and settings itself: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
AWS_SESSION_TOKEN, AWS_PROFILE, AWS_REGION / AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for S3-compatible stores (MinIO, Ceph, moto). Without any credentials the requests go
unsigned, which is what public buckets accept. `s3://bucket/key` is an object when one has that key, else
the prefix `key/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from lora_pipeline.errors import SourceError, UnsafePathError
from lora_pipeline.files import cache_work_dir, confined, place_complete, unsafe_reason
from lora_pipeline.progress import Meter
from lora_pipeline.sources import FIELD, Limits, redact

log = logging.getLogger(__name__)

CHECK_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 10}  # the fingerprint is the pre-flight check
DOWNLOAD_TIMEOUTS = {"connect_timeout": 10, "read_timeout": 60}
ATTEMPTS = 3  # botocore's "standard" retry mode: throttling, 5xx and connection errors, with backoff
_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_DENIED = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken")


class S3Source:
    def fetch(self, uri: str, dest: Path, limits: Limits) -> Path:
        # dataset.timeout: to connect, and the most seconds one read of the body may wait.
        client = _client(uri, {"connect_timeout": limits.timeout, "read_timeout": limits.timeout})
        bucket, key = _parse(uri)
        objects, prefix = _objects(client, uri, FIELD)
        total = sum(o["Size"] for o in objects)
        if limits.max_bytes and total > limits.max_bytes:
            raise SourceError(
                f"{redact(uri)} is {total} bytes, more than dataset.max_bytes ({limits.max_bytes})", field=FIELD
            )
        meter, progress = _progress(uri, total, limits)
        if prefix is None:  # one object
            name = PurePosixPath(key).name or "data.jsonl"
            target = confined(dest, name, what="object key", source=redact(uri))
            _download(client, uri, bucket, objects[0]["Key"], target, FIELD, progress)
        else:
            target = dest / "s3"
            for o in objects:
                _download(client, uri, bucket, o["Key"], target / _relative(o["Key"], prefix), FIELD, progress)
        meter.close()
        return target

    def fingerprint(self, uri: str) -> str:
        """An object's ETag and LastModified; for a prefix, the sha256 of its objects' keys, ETags and sizes."""
        objects, prefix = _objects(_client(uri, CHECK_TIMEOUTS), uri, FIELD)
        if prefix is None:
            o = objects[0]
            return f"etag:{o['ETag']};modified={o['LastModified'].isoformat()}"
        return f"s3-tree:{_tree_digest(objects, prefix)}"


def fetch_model(uri: str, cache_dir: Path) -> Path:
    """Every object under the prefix `uri`, downloaded once into `cache_dir`/s3-<digest of keys and ETags>.

    A complete copy is marked by a `.complete` file written last; a copy interrupted midway is never used
    (it is made in a temporary directory and renamed into place), so the next call starts it again.
    """
    field = "train.model"
    client = _client(uri, DOWNLOAD_TIMEOUTS, field)
    bucket, _ = _parse(uri, field)
    objects, prefix = _objects(client, uri, field)
    if prefix is None:
        raise SourceError(f"expected a prefix holding a model directory, got one object: {redact(uri)}", field=field)
    target = Path(cache_dir) / f"s3-{_tree_digest(objects, prefix)[:32]}"
    if (target / ".complete").is_file():
        return target
    with cache_work_dir(target) as tmp:
        for o in objects:
            _download(client, uri, bucket, o["Key"], tmp / _relative(o["Key"], prefix), field)
        place_complete(tmp, target, redact(uri))
    return target


def model_fingerprint(uri: str) -> str:
    """The identity of a model prefix (keys, ETags, sizes), without downloading: for pre-flight and cache keys."""
    field = "train.model"
    objects, prefix = _objects(_client(uri, CHECK_TIMEOUTS, field), uri, field)
    if prefix is None:
        raise SourceError(f"expected a prefix holding a model directory, got one object: {redact(uri)}", field=field)
    return f"s3-tree:{_tree_digest(objects, prefix)}"


def _parse(uri: str, field: str = FIELD) -> tuple[str, str]:
    from lora_pipeline.redaction import split_uri

    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    parts = split_uri(uri)  # `s3://AKIA:se/cret@bucket/key` holds credentials, though its "bucket" has no '@'
    if "@" in bucket or "?" in rest or (parts is not None and parts[1] is not None):
        raise SourceError(
            f"credentials and query strings do not belong in s3:// URIs (use the AWS_* variables): {redact(uri)}",
            field=field,
        )
    if not bucket:
        raise SourceError(f"no bucket in {redact(uri)}", field=field)
    return bucket, key


def _client(uri: str, timeouts: dict[str, float], field: str = FIELD) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    session = boto3.session.Session()
    signed = session.get_credentials() is not None
    config = Config(
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        signature_version=None if signed else UNSIGNED,
        **timeouts,
    )
    with _errors(uri, field):
        return session.client("s3", config=config)


def _objects(client: Any, uri: str, field: str) -> tuple[list[dict], str | None]:
    """([{"Key", "ETag", "Size", "LastModified"}], None for one object | the prefix listed)."""
    bucket, key = _parse(uri, field)
    with _errors(uri, field):
        if key and not key.endswith("/"):
            try:
                head = client.head_object(Bucket=bucket, Key=key)
                size, etag, modified = head["ContentLength"], head["ETag"], head["LastModified"]
                return [{"Key": key, "ETag": etag, "Size": size, "LastModified": modified}], None
            except Exception as exc:
                if _code(exc) not in _NOT_FOUND:
                    raise
            key += "/"
        objects = [
            o
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for o in page.get("Contents", [])
            if not o["Key"].endswith("/")  # "folder" markers that consoles create
        ]
    if not objects:
        raise SourceError(f"not found: {redact(uri)} (no object with this key, nor under this prefix)", field=field)
    return sorted(objects, key=lambda o: o["Key"]), key


def _tree_digest(objects: list[dict], prefix: str) -> str:
    digest = hashlib.sha256()
    for o in objects:
        digest.update(f"{_relative(o['Key'], prefix)}\0{o['ETag']}\0{o['Size']}\n".encode())
    return digest.hexdigest()


def _relative(key: str, prefix: str) -> str:
    """The object's path under the prefix; refused if it would climb out of the download directory."""
    rel = key[len(prefix) :]
    why = unsafe_reason(rel)
    if why:
        raise UnsafePathError(f"object key {key[:100]!r} {why}: it cannot be stored as a local file", field=FIELD)
    return rel


def _progress(uri: str, total: int, limits: Limits) -> tuple[Meter, Callable[[int], None]]:
    """boto3's transfer callback (bytes received since the last call): progress lines, and dataset.deadline
    checked as the bytes arrive (raising there cancels the transfer)."""
    from lora_pipeline.sources.http import Clock

    meter = Meter(log, f"download {redact(uri)}", "B", total)
    clock = Clock(uri, limits.timeout, limits.deadline)

    def received(n: int) -> None:
        meter.update(n)
        clock.check()

    return meter, received


def _download(
    client: Any,
    uri: str,
    bucket: str,
    key: str,
    target: Path,
    field: str,
    progress: Callable[[int], None] | None = None,
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _errors(uri, field):
        client.download_file(bucket, key, str(target), Callback=progress)


def _code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _errors(uri: str, field: str) -> Iterator[None]:
    """botocore's exceptions -> one SourceError line (its messages name no secret; scrubbed all the same)."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    from lora_pipeline.redaction import scrub

    try:
        yield
    except ClientError as exc:
        code, message = _code(exc), exc.response.get("Error", {}).get("Message") or ""
        detail = scrub(f"{code}: {message}" if message else code)
        if code == "NoSuchBucket":
            summary = "no such bucket"
        elif code in _NOT_FOUND:
            summary = "not found"
        elif code in _DENIED:
            summary = "access denied"
            if not _has_credentials():
                detail += "; no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        else:
            summary = "S3 error"
        raise SourceError(f"{summary}: {redact(uri)} ({detail})", field=field) from None
    except EndpointConnectionError as exc:
        raise SourceError(f"cannot connect: {redact(uri)} ({scrub(str(exc))})", field=field) from None
    except BotoCoreError as exc:
        raise SourceError(f"S3 request failed: {redact(uri)} ({scrub(str(exc))})", field=field) from None


def _has_credentials() -> bool:
    import boto3

    return boto3.session.Session().get_credentials() is not None
