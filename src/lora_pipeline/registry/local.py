"""The embedded registry: one SQLite file, Kubeflow's model (registered model -> versions -> artifact).

Used when registry.address is empty or `local`, so a laptop run registers end to end and
`lora-pipeline models list|show` can answer "which adapter was trained on what, and how did it score".
SQLite serialises writers on the file, so two runs registering at once cannot both create a version.
A version records its adapter's digest; the registry keeps its own copy of the adapter (see artifacts.py).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lora_pipeline.errors import RegistryError
from lora_pipeline.registry import Entry, Outcome
from lora_pipeline.registry.artifacts import AUTO, DIGEST_KEY, merged_name, next_patch, remove_copy, store

SCHEMA_VERSION = 2  # 2: version_artifact, a version's further artifacts (the merged model)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS registered_model (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_version (
    id INTEGER PRIMARY KEY,
    model_id INTEGER NOT NULL REFERENCES registered_model(id),
    name TEXT NOT NULL,
    author TEXT NOT NULL,
    description TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (model_id, name)
);
CREATE TABLE IF NOT EXISTS model_artifact (
    id INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL UNIQUE REFERENCES model_version(id),
    name TEXT NOT NULL,
    uri TEXT NOT NULL,
    format_name TEXT NOT NULL,
    format_version TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS version_artifact (
    id INTEGER PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES model_version(id),
    name TEXT NOT NULL,
    uri TEXT NOT NULL,
    format_name TEXT NOT NULL,
    format_version TEXT NOT NULL,
    digest TEXT NOT NULL,
    created TEXT NOT NULL,
    UNIQUE (version_id, name)
);
"""


class LocalRegistry:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise RegistryError(f"no local registry at {self.path}: nothing registered yet", field="registry.path")
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open {self.path}: {exc}", field="registry.path") from None
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA foreign_keys = ON")
            if write:
                db.execute("BEGIN IMMEDIATE")  # take the write lock before reading: check-then-insert is atomic
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            yield db
            if write:
                db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise RegistryError(f"{self.path}: {exc}", field="registry.path") from None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @property
    def blobs(self) -> Path:
        """The content-addressed copies of registered adapters, beside the registry file."""
        return self.path.parent / "blobs"

    def store(self, adapter: Path) -> tuple[str, str]:
        """Keep an immutable copy of `adapter`; returns (its path, the digest) for the Entry."""
        copy, digest = store(adapter, self.blobs)
        return str(copy), digest

    def register(self, entry: Entry) -> Outcome:
        """Register `entry`; `auto` as its version takes the version that holds the same content, else the
        next free patch. The write lock is held from the first read, so racing runs get distinct versions."""
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self._db(write=True) as db:
            model = db.execute("SELECT id FROM registered_model WHERE name = ?", (entry.name,)).fetchone()
            if model is None:
                model_id = db.execute(
                    "INSERT INTO registered_model (name, owner, created) VALUES (?, ?, ?)",
                    (entry.name, entry.author, now),
                ).lastrowid
            else:
                model_id = model["id"]
            rows = db.execute(
                "SELECT v.id AS vid, v.name, v.metadata, a.id AS aid FROM model_version v "
                "LEFT JOIN model_artifact a ON a.version_id = v.id WHERE v.model_id = ? ORDER BY v.id",
                (model_id,),
            ).fetchall()
            digests = {r["name"]: _recorded_digest(r["metadata"]) for r in rows}
            version = entry.version
            if version == AUTO:
                same = [name for name, digest in digests.items() if entry.digest and digest == entry.digest]
                version = same[0] if same else next_patch(digests)
            found = next((r for r in rows if r["name"] == version), None)
            if found is not None:
                _check_same_content(entry, version, digests[version])
                _add_merged(db, entry, found["vid"], version, now)
                return Outcome("exists", str(model_id), str(found["vid"]), str(found["aid"]), str(self.path), version)
            version_id = db.execute(
                "INSERT INTO model_version (model_id, name, author, description, metadata, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (model_id, version, entry.author, entry.description, json.dumps(entry.metadata), now),
            ).lastrowid
            artifact_id = db.execute(
                "INSERT INTO model_artifact (version_id, name, uri, format_name, format_version, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (version_id, entry.name, entry.uri, entry.format_name, entry.format_version, now),
            ).lastrowid
            _add_merged(db, entry, version_id, version, now)
        return Outcome("registered", str(model_id), str(version_id), str(artifact_id), str(self.path), version)

    def versions(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every version (of one model when `name` is given), oldest first, with its artifact and metadata."""
        query = (
            "SELECT m.name AS model, m.id AS model_id, v.id AS version_id, v.name AS version, v.author, "
            "v.description, v.metadata, v.created, a.id AS artifact_id, a.uri, a.format_name, a.format_version "
            "FROM model_version v JOIN registered_model m ON m.id = v.model_id "
            "LEFT JOIN model_artifact a ON a.version_id = v.id"
        )
        with self._db() as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'model_version'").fetchone():
                return []  # created by a racing first registration that has not committed its schema yet
            if name is None:
                rows = db.execute(query + " ORDER BY m.name, v.id").fetchall()
            else:
                rows = db.execute(query + " WHERE m.name = ? ORDER BY v.id", (name,)).fetchall()
        return [{**dict(r), "metadata": _metadata(r["metadata"])} for r in rows]

    def artifacts(self, version_id: str | int) -> list[dict[str, Any]]:
        """A version's further artifacts (the merged model), oldest first."""
        with self._db() as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'version_artifact'").fetchone():
                return []  # a registry file from before further artifacts
            rows = db.execute("SELECT * FROM version_artifact WHERE version_id = ? ORDER BY id", (int(version_id),))
            return [dict(r) for r in rows.fetchall()]

    def delete(self, name: str, version: str) -> list[Path]:
        """Remove a version (and its model when it was the last), then the copies no other version uses;
        returns the copies removed. The rows go in one transaction, the copies after it commits."""
        with self._db(write=True) as db:
            row = db.execute(
                "SELECT v.id, v.model_id FROM model_version v JOIN registered_model m ON m.id = v.model_id "
                "WHERE m.name = ? AND v.name = ?",
                (name, version),
            ).fetchone()
            if row is None:
                self.version(name, version)  # one line naming what there is
            uris = {r[0] for r in db.execute(_URIS, (row["id"], row["id"]))}
            for table in ("version_artifact", "model_artifact"):
                db.execute(f"DELETE FROM {table} WHERE version_id = ?", (row["id"],))
            db.execute("DELETE FROM model_version WHERE id = ?", (row["id"],))
            if not db.execute("SELECT 1 FROM model_version WHERE model_id = ?", (row["model_id"],)).fetchone():
                db.execute("DELETE FROM registered_model WHERE id = ?", (row["model_id"],))
            still_used = {r[0] for r in db.execute(_URIS.replace(" WHERE version_id = ?", ""))}
        removed = []
        for uri in sorted(uris - still_used):
            path = Path(uri)
            # only the registry's own copies go, never files a run wrote
            if path.parent.parent.resolve() == self.blobs.resolve() and path.is_dir():
                remove_copy(path)
                removed.append(path)
        return removed

    def find(self, name: str, version: str) -> dict[str, Any] | None:
        for row in self.versions(name):
            if row["version"] == version:
                return row
        return None

    def version(self, name: str, version: str | None = None) -> dict[str, Any]:
        """One version of a model (its latest registered one when `version` is None)."""
        found = self.versions(name)
        if not found:
            raise RegistryError(f"no model named {name!r} in {self.path}", field="models")
        if version is None:
            return found[-1]
        for row in found:
            if row["version"] == version:
                return row
        known = ", ".join(r["version"] for r in found)
        raise RegistryError(f"{name} has no version {version!r} (versions: {known})", field="models")


_URIS = (
    "SELECT uri FROM model_artifact WHERE version_id = ? UNION SELECT uri FROM version_artifact WHERE version_id = ?"
)


def _add_merged(db: sqlite3.Connection, entry: Entry, version_id: int, version: str, now: str) -> None:
    """The merged model as the version's further artifact: added once with its own digest, never replaced."""
    if not entry.merged_uri:
        return
    name = merged_name(entry.name)
    held = db.execute(
        "SELECT uri, digest FROM version_artifact WHERE version_id = ? AND name = ?", (version_id, name)
    ).fetchone()
    if held is None:
        db.execute(
            "INSERT INTO version_artifact (version_id, name, uri, format_name, format_version, digest, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (version_id, name, entry.merged_uri, entry.format_name, entry.format_version, entry.merged_digest, now),
        )
    elif held["digest"] != entry.merged_digest:
        raise RegistryError(
            f"{entry.name} {version} already holds a merged model with other content (sha256 {held['digest'][:12]}…, "
            f"this one {entry.merged_digest[:12]}…); nothing was replaced: set a new --registry.version, or auto",
            field="registry.version",
        )


def _metadata(text: str) -> dict[str, Any]:
    """A version's metadata as recorded; a row edited or damaged outside lora-pipeline reads as empty (and so
    has no digest: never the same content)."""
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _recorded_digest(metadata: str) -> str | None:
    """A version's digest; None for one registered before digests were, or with unreadable metadata
    (neither can be shown to hold the same content)."""
    try:
        value = json.loads(metadata).get(DIGEST_KEY)
    except (ValueError, TypeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _check_same_content(entry: Entry, version: str, digest: str | None) -> None:
    """Same name+version is a no-op only for the same content: decided by digest, never by path."""
    if digest and digest == entry.digest:
        return
    recorded = f"sha256 {digest[:12]}…" if digest else "no recorded digest"
    raise RegistryError(
        f"{entry.name} {version} already exists with other content ({recorded}, this adapter sha256 "
        f"{entry.digest[:12]}…); nothing was overwritten: set a new --registry.version, or auto",
        field="registry.version",
    )
