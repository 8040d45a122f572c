"""One exception family. The CLI prints these as one line and exits 2; anything else is a bug."""

from __future__ import annotations

import errno


class LoraPipelineError(Exception):
    """An error the user can fix: bad input, missing file, unreachable service."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class ConfigError(LoraPipelineError):
    """A config value is unknown, mistyped, out of range or conflicts with another."""


class DataError(LoraPipelineError):
    """A dataset file or row cannot be used."""


class SourceError(LoraPipelineError):
    """A data or model URI cannot be fetched."""


class UnsafePathError(SourceError):
    """Fetched content (metadata, a dataset card, a manifest, an archive member) names a path outside its directory."""


class StageError(LoraPipelineError):
    """A stage cannot run with what it was given (missing inputs, missing optional package)."""


class RegistryError(LoraPipelineError):
    """The model registry refused or could not be reached."""


class LockedError(LoraPipelineError):
    """Another process holds the run directory."""


def one_line(text: str, limit: int = 2000) -> str:
    """`text` as one printable line: the lines of a multi-line message (a pydantic or YAML dump) joined with
    " | ", control characters, lone surrogates (undecodable bytes) and other unprintables escaped, so an error
    line can neither forge terminal output nor span several lines."""
    parts = [" ".join(line.split()) for line in str(text).splitlines()]
    joined = " | ".join(p for p in parts if p)
    shown = "".join(c if c.isprintable() else _escape(c) for c in joined)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


# OSErrors that are the user's environment, not a bug: a full disk, a read-only or forbidden path.
USER_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.EEXIST,
    }
)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError the user can fix: what happened, and the path it happened to."""
    reason = exc.strerror or type(exc).__name__
    where = exc.filename if exc.filename is not None else None
    return f"{where}: {reason.lower()}" if where is not None else reason.lower()
