"""What a registered version's content is: a digest of the adapter directory, the local registry's
content-addressed copies of adapters, and the next free patch version for `--registry.version auto`.

A registration names content, not a path: a retrain writes new files into the same run directory, so the
path of a registered adapter says nothing about what was registered. The digest does, and the local
registry keeps its own copy under `blobs/sha256/<digest>/` beside its file, which no run writes into.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from lora_pipeline.errors import RegistryError
from lora_pipeline.files import owned_prefix, remove_stale_temp, tree_sha256

AUTO = "auto"
DIGEST_KEY = "artifact_sha256"  # the version metadata key that holds the digest, in both registries
MERGED_SUFFIX = "-merged"  # the merged model's artifact name: the registered model's name + this
_RELEASE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")


def tree_digest(root: Path) -> str:
    """sha256 over a directory's files (files.tree_sha256): independent of its location, mtimes and permissions."""
    root = Path(root)
    if not root.is_dir():
        raise RegistryError(f"not a directory: {root}", field="register")
    return tree_sha256(root)


def blob_path(blobs: Path, digest: str) -> Path:
    return Path(blobs) / "sha256" / digest


def store(adapter: Path, blobs: Path) -> tuple[Path, str]:
    """Copy `adapter` into the content-addressed store `blobs` (once per content); returns (copy, digest).

    The digest is taken of the copy, so what is recorded is what is kept even if the source changes while
    being copied; a copy that differs from its source is refused. Files are made read-only."""
    digest = tree_digest(adapter)
    final = blob_path(blobs, digest)
    if final.is_dir():
        return final, digest
    final.parent.mkdir(parents=True, exist_ok=True)
    # Named for its owner: a copy cut off by a kill is removed by the next registration, not kept forever.
    remove_stale_temp(final.parent, ".tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(".tmp-"), dir=final.parent))
    try:
        shutil.copytree(adapter, tmp / "adapter")
        copied = tree_digest(tmp / "adapter")
        if copied != digest:
            raise RegistryError(f"{adapter} changed while it was being copied: register again", field="register")
        for path in (tmp / "adapter").rglob("*"):
            if path.is_file():
                path.chmod(0o444)  # the registered files are not edited in place by accident
        try:
            os.rename(tmp / "adapter", final)
        except OSError:
            if not final.is_dir():  # another registration of the same content won the race: keep its copy
                raise
    except OSError as exc:
        reason = exc.strerror or exc
        raise RegistryError(f"cannot copy {adapter} into {blobs}: {reason}", field="registry.path") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, digest


def remove_copy(copy: Path) -> None:
    """Remove a stored copy: renamed out of its content's place first, so that a removal cut off by a kill
    leaves no partial copy there for `store` to take as whole (it is then a dead process's temporary folder)."""
    gone = Path(tempfile.mkdtemp(prefix=owned_prefix(".tmp-"), dir=copy.parent))
    os.replace(copy, gone)  # onto the empty folder just made
    shutil.rmtree(gone)


def verify(uri: str, digest: str) -> str | None:
    """None when the files at `uri` (a local path) still have `digest`, else one line saying what changed."""
    path = Path(uri)
    if not path.is_dir():
        return f"the registered files are gone: {uri} does not exist"
    now = tree_digest(path)
    if now != digest:
        return f"the files at {uri} changed since registration (sha256 {digest[:12]}… recorded, {now[:12]}… now)"
    return None


def next_patch(versions: Iterable[str]) -> str:
    """The next free patch version after the highest major.minor.patch among `versions` (1.0.0 for none).
    Pre-release and build suffixes count by their release part."""
    releases = [tuple(int(g) for g in m.groups()) for v in versions if (m := _RELEASE.match(v))]
    if not releases:
        return "1.0.0"
    major, minor, patch = max(releases)
    return f"{major}.{minor}.{patch + 1}"


def merged_name(model_name: str) -> str:
    """The name of a version's second artifact, the merged model (the adapter's artifact is `model_name`)."""
    return model_name + MERGED_SUFFIX


def canonical_adapter_config(adapter: Path) -> None:
    """PEFT writes `target_modules` from a set, in an order that changes with the interpreter's hash seed:
    sorted, the same training gives the same bytes, so the registry recognises it as the same content."""
    path = Path(adapter) / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))
