"""Local files and mounted volumes (a PVC is just a path): used in place, never copied."""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.config import local_path
from lora_pipeline.data.readers import data_files
from lora_pipeline.errors import SourceError
from lora_pipeline.files import sha256_file, tree_sha256
from lora_pipeline.sources import FIELD, Limits
from lora_pipeline.sources.archives import is_archive


class LocalSource:
    def fetch(self, uri: str, dest: Path, limits: Limits) -> Path:
        return _existing(uri)

    def fingerprint(self, uri: str) -> str:
        """sha256 of the file, or of the sorted (relative path, file sha256) of a directory's data files.

        Content, not size and mtime: `touch` keeps the fingerprint, an edit in place that keeps the size
        and the mtime (rsync -t, a restored backup) still changes it.
        """
        path = _existing(uri)
        if is_archive(path):
            return f"sha256:{file_sha256(path)}"
        if not path.is_dir():
            data_files(path)  # an unsupported file type fails here, before any stage runs
            return f"sha256:{file_sha256(path)}"
        try:
            return f"sha256-tree:{tree_sha256(path, data_files(path))}"
        except OSError as exc:
            raise SourceError(f"cannot read a file under {path}: {exc.strerror or exc}", field=FIELD) from None


def _existing(uri: str) -> Path:
    path = Path(local_path(uri))
    if not path.exists():
        raise SourceError(f"file not found: {path}", field=FIELD)
    return path


def file_sha256(path: Path) -> str:
    """Streamed in blocks: data files can be larger than memory."""
    try:
        return sha256_file(path)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}", field=FIELD) from None
