"""URI -> local file. One small class per scheme behind a name table, as peft does for its tuners:
adding a source (hf://, s3://) is one new module and one row in SOURCES."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

from lora_pipeline.errors import SourceError


class Source(Protocol):
    def fetch(self, uri: str, dest: Path) -> Path:
        """Make the data at `uri` available as a local file or directory (under `dest` when copied)."""
        ...


def _sources() -> dict[str, Source]:
    from lora_pipeline.sources.http import HttpSource
    from lora_pipeline.sources.local import LocalSource

    return {"file": LocalSource(), "http": HttpSource(), "https": HttpSource()}


def scheme_of(uri: str) -> str:
    return urlsplit(uri).scheme.lower() if "://" in uri else "file"


def fetch(uri: str, dest: Path) -> Path:
    scheme = scheme_of(uri)
    source = _sources().get(scheme)
    if source is None:
        raise SourceError(f"{scheme}:// sources are not supported yet: {redact(uri)}", field="dataset.data_uri")
    return source.fetch(uri, dest)


def redact(uri: str) -> str:
    """Drop user:password@ and query strings (pre-signed URL tokens) before a URI is logged or stored."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
