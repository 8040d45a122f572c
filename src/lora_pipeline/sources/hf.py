"""hf://owner/name[/config][?split=train&revision=...]: a dataset repository on the Hugging Face Hub.

huggingface_hub downloads the repository's data files into (or finds them in) the HF cache, honouring
HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE and HF_HOME / HF_HUB_CACHE; `datasets` then says which files make up
the config's split (the README's `configs:` section, else its naming conventions), and the dataset stage
reads those files like local ones. Nothing is converted or copied: the split's files are linked from the
cache. The fingerprint is the commit the revision resolves to (the cache's snapshot name when offline).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from lora_pipeline.errors import SourceError
from lora_pipeline.files import confined
from lora_pipeline.sources import FIELD, Limits, redact

# What is downloaded from a dataset repository: data files and the card that declares its configs.
PATTERNS = ["*.parquet", "*.jsonl", "*.json", "*.csv", "*.arrow", "README.md"]
CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Ref:
    repo: str
    config: str | None
    split: str
    revision: str | None


class HfSource:
    def fetch(self, uri: str, dest: Path, limits: Limits) -> Path:
        ref = parse(uri)
        files, snapshot = _split_files(uri, ref, limits.timeout)
        root = dest / "hf"
        for f in files:
            link = root / f.relative_to(snapshot)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f.resolve())
        total = sum(f.stat().st_size for f in files)
        if limits.max_bytes and total > limits.max_bytes:
            raise SourceError(
                f"{redact(uri)} is {total} bytes, more than dataset.max_bytes ({limits.max_bytes})", field=FIELD
            )
        return root

    def fingerprint(self, uri: str) -> str:
        """The commit sha of the revision. Offline, the cached snapshot's (and the split is checked, which
        costs nothing there); online, one API call, and the split is checked when the stage runs."""
        from huggingface_hub import constants

        ref = parse(uri)
        if constants.HF_HUB_OFFLINE:
            _, snapshot = _split_files(uri, ref)
            return f"hf:{snapshot.name}"
        from huggingface_hub import HfApi

        with _hub_errors(uri, ref):
            info = HfApi().dataset_info(ref.repo, revision=ref.revision, timeout=CHECK_TIMEOUT_S)
        return f"hf:{info.sha}"


def parse(uri: str) -> Ref:
    rest = uri.split("://", 1)[1]
    path, _, query = rest.partition("?")
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["datasets"]:  # hf://datasets/owner/name, the form HfFileSystem uses
        parts = parts[1:]
    if not 1 <= len(parts) <= 3 or "@" in path:
        raise SourceError(f"expected hf://owner/name[/config][?split=...&revision=...], got {redact(uri)}", field=FIELD)
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    options = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(options) - {"split", "revision"})
    if unknown:
        raise SourceError(f"unknown option {unknown[0]!r} in {redact(uri)} (known: split, revision)", field=FIELD)
    split = options.get("split", ["train"])[-1] or "train"
    return Ref(repo, config, split, options.get("revision", [None])[-1] or None)


def _split_files(uri: str, ref: Ref, timeout: float = CHECK_TIMEOUT_S) -> tuple[list[Path], Path]:
    """(the split's data files, the snapshot directory they are in)."""
    snapshot = _snapshot(uri, ref, timeout)
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(snapshot), name=ref.config)
    except ValueError as exc:  # "BuilderConfig 'x' not found. Available: [...]"
        reason = (str(exc).strip().splitlines() or ["unknown config"])[0][:300]
        raise SourceError(f"{redact(uri)}: {reason}", field=FIELD) from None
    except FileNotFoundError:
        raise SourceError(f"{redact(uri)}: no data files in the dataset repository", field=FIELD) from None
    data_files = builder.config.data_files or {}
    splits = {str(name): files for name, files in data_files.items()}
    if ref.split not in splits:
        known = ", ".join(splits) or "none"
        raise SourceError(f"{redact(uri)}: no split {ref.split!r} (splits: {known})", field=FIELD)
    # The card's `path:` patterns are data: a file they resolve to is taken only inside the snapshot (its
    # links may point into the repository's blob store, two levels up, and nowhere else).
    names = [os.path.relpath(str(f).split("::")[0], snapshot) for f in splits[ref.split]]
    what = f"dataset card data_files path (split {ref.split!r})"
    files = [confined(snapshot, n, what=what, source=redact(uri), links_to=snapshot.parents[1]) for n in names]
    return files, snapshot


def _snapshot(uri: str, ref: Ref, timeout: float) -> Path:
    """The repository's files; a request waits at most `timeout` (dataset.timeout) for an answer, and for
    each read of a file's bytes unless HF_HUB_DOWNLOAD_TIMEOUT says otherwise."""
    from huggingface_hub import constants, snapshot_download

    with _hub_errors(uri, ref), _download_timeout(constants, timeout):
        return Path(
            snapshot_download(
                ref.repo,
                repo_type="dataset",
                revision=ref.revision,
                cache_dir=constants.HF_HUB_CACHE,
                local_files_only=constants.HF_HUB_OFFLINE,
                allow_patterns=PATTERNS,
                etag_timeout=timeout,
            )
        )


@contextlib.contextmanager
def _download_timeout(constants: Any, seconds: float) -> Iterator[None]:
    """huggingface_hub reads its download timeout from a module constant at each request (set from the
    environment at import); the option takes its place for this fetch when the variable is not set."""
    if "HF_HUB_DOWNLOAD_TIMEOUT" in os.environ:
        yield
        return
    before = constants.HF_HUB_DOWNLOAD_TIMEOUT
    constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    try:
        yield
    finally:
        constants.HF_HUB_DOWNLOAD_TIMEOUT = before


class _hub_errors:  # noqa: N801 - used as a context manager, like contextlib's
    """huggingface_hub's exceptions -> one SourceError line."""

    def __init__(self, uri: str, ref: Ref) -> None:
        self.uri, self.ref = uri, ref

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        from lora_pipeline.redaction import scrub

        repo = self.ref.repo
        if isinstance(exc, GatedRepoError):
            message = f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN"
        elif isinstance(exc, RepositoryNotFoundError):
            message = f"no dataset {repo} on the Hugging Face Hub (or HF_TOKEN lacks access)"
        elif isinstance(exc, RevisionNotFoundError):
            message = f"no revision {self.ref.revision!r} in {repo}"
        elif isinstance(exc, LocalEntryNotFoundError):
            message = f"{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        elif isinstance(exc, HFValidationError):
            message = f"not a valid dataset repository id: {repo!r}"
        else:  # network errors come in many types (httpx, requests, OSError)
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            message = f"cannot reach the Hugging Face Hub for {repo} ({scrub(reason)})"
        raise SourceError(f"{message}: {redact(self.uri)}", field=FIELD) from None
