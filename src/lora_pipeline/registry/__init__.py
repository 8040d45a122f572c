"""Model registries: the local SQLite file (the default) and the Kubeflow Model Registry, behind one Protocol.

Both follow Kubeflow's model: a registered model has versions, a version has a model artifact (the adapter's
URI; with train.merge a second one, the merged model, each with its own digest, only ever added), and
name+version is unique. A version records its adapter's digest (`artifact_sha256`), and registering
is idempotent by content: the same name+version with the same digest is a no-op that reports the existing
ids; other content is refused and nothing is overwritten. The local registry registers its own immutable copy.

`registry.address` picks one: `local` = the local file, empty or `none` = no registration (the spec's
default: a run registers nothing unless asked), anything else = a Kubeflow Model Registry at that address.
Clients are imported and built only when used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lora_pipeline.config import RegistryConfig

LOCAL = ("local",)
SKIP = ("", "none")
TOKEN_ENV = "MODEL_REGISTRY_TOKEN"

# A version's metadata values: what both registries store as-is (Kubeflow's custom properties are typed).
Scalar = str | int | float | bool


@dataclass
class Entry:
    """One model version to register: the registered model's name, the version and its artifact."""

    name: str
    version: str
    uri: str
    author: str = ""
    description: str = ""
    format_name: str = "pytorch"
    format_version: str = "1.0"
    metadata: dict[str, Scalar] = field(default_factory=dict)
    digest: str = ""  # sha256 of the adapter's files (artifacts.tree_digest)
    # train.merge's merged model: a second artifact of the same version, with its own digest
    merged_uri: str = ""
    merged_digest: str = ""

    def __post_init__(self) -> None:
        # Both registries keep the digest in the version's metadata: Kubeflow's custom properties have room
        # for it, and the local file needs no schema change.
        if self.digest:
            from lora_pipeline.registry.artifacts import DIGEST_KEY

            self.metadata = {**self.metadata, DIGEST_KEY: self.digest}


@dataclass
class Outcome:
    """What registering did: `registered` (new version) or `exists` (the same version and content was there)."""

    status: str
    model_id: str
    version_id: str
    artifact_id: str
    where: str  # the registry: a file path or a URL
    version: str = ""  # the version registered: `auto` resolved

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "registry": self.where,
            "registered_model_id": self.model_id,
            "model_version_id": self.version_id,
            "model_artifact_id": self.artifact_id,
            **({"version": self.version} if self.version else {}),
        }


class Registry(Protocol):
    def register(self, entry: Entry) -> Outcome: ...


def kind(cfg: RegistryConfig) -> str:
    """'local', 'none' or 'kubeflow', from registry.address."""
    address = cfg.address.strip().lower()
    if address in LOCAL:
        return "local"
    return "none" if address in SKIP else "kubeflow"


def local_path(cfg: RegistryConfig | None = None) -> Path:
    """The local registry file: registry.path, $LORA_PIPELINE_REGISTRY, $LORA_PIPELINE_HOME/registry.db, or
    the user's data directory (a registry outlives caches, so not ~/.cache)."""
    if cfg is not None and cfg.path:
        return Path(cfg.path).expanduser()
    if os.environ.get("LORA_PIPELINE_REGISTRY"):
        return Path(os.environ["LORA_PIPELINE_REGISTRY"]).expanduser()
    if os.environ.get("LORA_PIPELINE_HOME"):
        return Path(os.environ["LORA_PIPELINE_HOME"]) / "registry.db"
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "lora-pipeline" / "registry.db"


def token(cfg: RegistryConfig) -> str:
    """The bearer token: registry.token, else $MODEL_REGISTRY_TOKEN. A value that came back redacted from
    run.json is no token."""
    from lora_pipeline.redaction import is_redacted, reveal

    value = reveal(cfg.token)
    value = value if value and not is_redacted(value) else os.environ.get(TOKEN_ENV, "")
    return value.strip()


def remember_secret(cfg: RegistryConfig) -> None:
    """Make a secret option (schema metadata secret=True: registry.token) as secret as one from the
    environment: redaction scrubs the values of env vars named *TOKEN* from run.json, --print_config, logs
    and error lines. Values shorter than 6 characters are not scrubbed (redaction's rule)."""
    import dataclasses

    from lora_pipeline.redaction import is_redacted, reveal

    for f in dataclasses.fields(cfg):
        value = reveal(getattr(cfg, f.name))
        if f.metadata.get("secret") and isinstance(value, str) and value and not is_redacted(value):
            os.environ[f"LORA_PIPELINE_SECRET_REGISTRY_{f.name.upper()}"] = value


def open_registry(cfg: RegistryConfig) -> Registry:
    """The registry that registry.address names (not for 'none')."""
    if kind(cfg) == "local":
        from lora_pipeline.registry.local import LocalRegistry

        return LocalRegistry(local_path(cfg))
    from lora_pipeline.registry.kubeflow import KubeflowRegistry

    return KubeflowRegistry(
        cfg.address, cfg.port, author=cfg.author, token=token(cfg), ca_cert=cfg.ca_cert, timeout=cfg.timeout
    )


def check_local(cfg: RegistryConfig, adapter: Path | None) -> None:
    """Pre-flight for the local registry: its file can be written, and name+version is free or already
    holds this run's adapter (same digest), so a clash is reported before training, not after. `auto`
    cannot clash; it is for the local registry only."""
    from lora_pipeline.errors import ConfigError
    from lora_pipeline.registry.artifacts import AUTO, DIGEST_KEY, tree_digest

    if cfg.version == AUTO and kind(cfg) == "kubeflow":
        raise ConfigError(
            "auto applies to the local registry (--registry.address local): give a version for a Model Registry",
            field="registry.version",
        )
    if kind(cfg) != "local":
        return
    from lora_pipeline.registry.local import LocalRegistry

    path = local_path(cfg)
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"cannot write the local registry {path} ({probe} is not writable)", field="registry.path")
    if adapter is None or cfg.version == AUTO or not path.exists():
        return
    existing = LocalRegistry(path).find(cfg.model_name, cfg.version)
    if existing is None:
        return
    recorded = existing["metadata"].get(DIGEST_KEY)
    if not (recorded and adapter.is_dir() and tree_digest(adapter) == recorded):
        raise ConfigError(
            f"{cfg.model_name} {cfg.version} already exists with other content than this run's adapter "
            f"(in {path}): set a new --registry.version, or auto (or --registry.model_name)",
            field="registry.version",
        )
