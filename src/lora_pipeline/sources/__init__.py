"""URI -> local file, and URI -> content identity. One small class per scheme behind a name table, as peft
does for its tuners: adding a source is one new module and one row in `_sources`.

Every message, log line and record that names a URI names `redact(uri)`: credentials and query strings
(pre-signed URL tokens) are used for the request and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lora_pipeline.errors import SourceError
from lora_pipeline.files import sha256_file

FIELD = "dataset.data_uri"  # the option every source error points the user to
MARK = "<redacted>"  # what redact() leaves where it removed something


@dataclass(frozen=True)
class Limits:
    """What a fetch must respect: the expected sha256 of a single file, a size cap (0 = none), the seconds to
    connect and that a transfer may go without progress (`timeout`), and for the whole fetch, retries
    included (`deadline`, 0 = none)."""

    sha256: str = ""
    max_bytes: int = 0
    timeout: float = 30.0
    deadline: float = 0.0


class Source(Protocol):
    def fetch(self, uri: str, dest: Path, limits: Limits) -> Path:
        """Make the data at `uri` available as a local file or directory (under `dest` when copied).

        A source that downloads stops at `limits.max_bytes`; checksums and archives are handled by fetch().
        """
        ...

    def fingerprint(self, uri: str) -> str:
        """A short text that changes when the data at `uri` changes ("sha256:...", "etag:...").

        Raises SourceError when the data does not exist or cannot be reached, so it is also the pre-flight
        check of the source: it must stay fast and bounded in time.
        """
        ...


# scheme -> (module, class): imported on first use, so boto3 or `datasets` load only for the URIs that need them.
SOURCES = {
    "file": ("local", "LocalSource"),
    "http": ("http", "HttpSource"),
    "https": ("http", "HttpSource"),
    "s3": ("s3", "S3Source"),
    "hf": ("hf", "HfSource"),
}


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def _source_for(uri: str) -> Source:
    import importlib

    scheme = scheme_of(uri)
    if scheme not in SOURCES:
        known = ", ".join(f"{s}://" for s in SOURCES if s != "file")
        raise SourceError(f"{scheme}:// sources are not supported (use {known} or a path): {redact(uri)}", field=FIELD)
    module, name = SOURCES[scheme]
    return getattr(importlib.import_module(f"lora_pipeline.sources.{module}"), name)()


def fetch(uri: str, dest: Path, limits: Limits | None = None) -> Path:
    """The data at `uri` as a local file or directory: downloaded under `dest` if remote, checked against its
    sha256 (`limits.sha256` or a `#sha256=...` fragment), and unpacked under `dest` if it is an archive."""
    from lora_pipeline.sources import archives

    limits = limits or Limits()
    uri, expected = split_checksum(uri, limits.sha256)
    path = _source_for(uri).fetch(uri, dest, limits)
    if expected:
        _verify(path, expected, uri)
    if archives.is_archive(path):
        path = archives.unpack(path, dest / "unpacked", limits.max_bytes)
    return path


def fingerprint(uri: str) -> str:
    """The content identity of the data at `uri`, for cache keys; raises SourceError if it is not there."""
    uri, _ = split_checksum(uri, "")
    return _source_for(uri).fingerprint(uri)


MODEL_SCHEMES = ("s3://", "oci://")  # base models fetched into the model cache (see models.resolve_model)


def fetch_model(uri: str, cache_dir: Path) -> Path:
    """A base model given as a URI (s3://bucket/prefix/, oci://registry/repo:tag) as a local directory,
    cached under `cache_dir` by content (ETags, manifest digest): a second run downloads nothing."""
    return _model_module(uri).fetch_model(uri, cache_dir)


def model_fingerprint(uri: str) -> str:
    """The content identity of a model URI (s3://bucket/prefix/, oci://...) without downloading it; SourceError
    naming train.model when it is not there or cannot be reached. Pre-flight check and cache-key input."""
    return _model_module(uri).model_fingerprint(uri)


def _model_module(uri: str):  # noqa: ANN202 - a module
    import importlib

    if not uri.startswith(MODEL_SCHEMES):
        raise SourceError(f"models can be fetched from s3:// and oci:// only: {redact(uri)}", field="train.model")
    return importlib.import_module(f"lora_pipeline.sources.{scheme_of(uri)}")


def split_checksum(uri: str, expected: str) -> tuple[str, str]:
    """(`uri` without a `#sha256=<hex>` fragment, the checksum to verify: the option's, else the fragment's)."""
    if "://" in uri and "#sha256=" in uri:
        uri, digest = uri.rsplit("#sha256=", 1)
        expected = expected or digest
    return uri, expected.lower()


def _verify(path: Path, expected: str, uri: str) -> None:
    if path.is_dir():
        raise SourceError(f"a sha256 applies to one file, and {redact(uri)} is several", field=FIELD)
    actual = sha256_file(path)
    if actual != expected:
        raise SourceError(f"checksum mismatch: {redact(uri)} has sha256 {actual}, expected {expected}", field=FIELD)


def redact(uri: str) -> str:
    """`uri` with user:password@ and the query string replaced by a visible marker; fragments are kept, and so
    is the query of hf:// URIs (split and revision). Parsed, never pattern-matched: see redaction.split_uri."""
    from lora_pipeline.redaction import redact_uri

    return redact_uri(uri)


def is_redacted(uri: str) -> bool:
    """True for the output of redact() when it removed something: such a URI cannot be fetched again."""
    return f"://{MARK}@" in uri or f"?{MARK}" in uri
