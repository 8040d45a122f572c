"""Local files and mounted volumes (a PVC is just a path): used in place, never copied."""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.config import local_path
from lora_pipeline.errors import SourceError


class LocalSource:
    def fetch(self, uri: str, dest: Path) -> Path:
        path = Path(local_path(uri))
        if not path.exists():
            raise SourceError(f"file not found: {path}", field="dataset.data_uri")
        return path
