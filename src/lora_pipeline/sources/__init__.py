"""URI -> local file, and URI -> content identity. One small class per scheme behind a name table, as peft
does for its tuners: adding a source (hf://, s3://) is one new module and one row in SOURCES.

Every message, log line and record that names a URI names `redact(uri)`: credentials and query strings
(pre-signed URL tokens) are used for the request and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from lora_pipeline.errors import SourceError

FIELD = "dataset.data_uri"  # the option every source error points the user to
MARK = "<redacted>"  # what redact() leaves where it removed something


class Source(Protocol):
    def fetch(self, uri: str, dest: Path) -> Path:
        """Make the data at `uri` available as a local file or directory (under `dest` when copied)."""
        ...

    def fingerprint(self, uri: str) -> str:
        """A short text that changes when the data at `uri` changes ("sha256:...", "etag:...").

        Raises SourceError when the data does not exist or cannot be reached, so it is also the pre-flight
        check of the source: it must stay fast and bounded in time.
        """
        ...


def _sources() -> dict[str, Source]:
    from lora_pipeline.sources.http import HttpSource
    from lora_pipeline.sources.local import LocalSource

    return {"file": LocalSource(), "http": HttpSource(), "https": HttpSource()}


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def _source_for(uri: str) -> Source:
    scheme = scheme_of(uri)
    source = _sources().get(scheme)
    if source is None:
        raise SourceError(f"{scheme}:// sources are not supported yet: {redact(uri)}", field=FIELD)
    return source


def fetch(uri: str, dest: Path) -> Path:
    return _source_for(uri).fetch(uri, dest)


def fingerprint(uri: str) -> str:
    """The content identity of the data at `uri`, for cache keys; raises SourceError if it is not there."""
    return _source_for(uri).fingerprint(uri)


def redact(uri: str) -> str:
    """`uri` with user:password@ and the query string replaced by a visible marker; fragments are kept.

    Parsed by hand rather than with urlsplit, which raises on some malformed URIs: this runs in error
    paths, where a second exception would hide the first and might print the URI in full.
    """
    if "://" not in uri:
        return uri  # a local path
    scheme, rest = uri.split("://", 1)
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = f"{MARK}@{authority.rsplit('@', 1)[1]}"
    tail, hash_sign, fragment = tail.partition("#")
    path, question_mark, query = tail.partition("?")
    if query:
        path = f"{path}?{MARK}"
    elif question_mark:
        path += "?"
    return f"{scheme}://{authority}{path}{hash_sign}{fragment}"


def is_redacted(uri: str) -> bool:
    """True for the output of redact() when it removed something: such a URI cannot be fetched again."""
    return f"://{MARK}@" in uri or f"?{MARK}" in uri
