"""One exception family. The CLI prints these as one line and exits 2; anything else is a bug."""

from __future__ import annotations


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
