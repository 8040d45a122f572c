"""An OCI image's layers applied to a directory, in order, whiteouts included, every entry confined to it;
and the model directory found in the result.

A layer is a tar (optionally gzip-compressed) as a container runtime would apply it, or, in an ORAS artifact,
one file named by its `org.opencontainers.image.title` annotation (a directory pushed by ORAS is a tar+gzip
with `io.deis.oras.content.unpack`). Entries are written by hand, not by tarfile.extractall, so that whiteouts
apply and a link can never lead a later entry outside the directory.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from pathlib import Path

from lora_pipeline.errors import SourceError, UnsafePathError
from lora_pipeline.files import confined, unsafe_reason

FIELD = "train.model"
TITLE = "org.opencontainers.image.title"
UNPACK = "io.deis.oras.content.unpack"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def apply_layer(blob: Path, layer: dict, root: Path, source: str) -> None:
    """Apply one layer (a manifest's descriptor, its blob at `blob`) onto `root`."""
    media = str(layer.get("mediaType", ""))
    annotations = layer.get("annotations") or {}
    title = annotations.get(TITLE)
    if title and str(annotations.get(UNPACK, "")).lower() != "true" and not tarfile.is_tarfile(blob):
        target = confined(root, title, what="layer title", source=source, field=FIELD)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(blob, target)
        return
    if "zstd" in media:
        raise SourceError(f"{source}: zstd-compressed layers are not supported ({media})", field=FIELD)
    digest = str(layer.get("digest", "?"))
    if not tarfile.is_tarfile(blob):
        raise SourceError(f"{source}: layer {digest} is not a tar archive ({media})", field=FIELD)
    try:
        with tarfile.open(blob, "r:*") as tf:
            for member in tf:
                _apply_entry(tf, member, root, source)
    except (tarfile.TarError, EOFError, OSError) as exc:  # a truncated archive; a file where a folder must be
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise SourceError(f"{source}: cannot apply layer {digest} ({detail[:200]})", field=FIELD) from None


def _apply_entry(tf: tarfile.TarFile, m: tarfile.TarInfo, root: Path, source: str) -> None:
    name = m.name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/")
    if name in ("", "."):
        return  # the layer's own root
    why = unsafe_reason(name)
    if why:
        raise UnsafePathError(f"{source}: layer entry {ascii(name)[:120]} {why}; refused", field=FIELD)
    # `models/.` is `models`: a symbolic link's depth (its relative target) is counted on the normal form
    name = posixpath.normpath(name)
    if name == ".":
        return
    base = posixpath.basename(name)
    parent = posixpath.dirname(name)
    if base == OPAQUE:  # the directory's contents from lower layers are hidden
        folder = confined(root, parent, what="layer entry", source=source, field=FIELD) if parent else root
        for child in list(folder.iterdir()) if folder.is_dir() else []:
            _remove(child)
        return
    if base.startswith(WHITEOUT):  # the named path from lower layers is deleted
        if base[len(WHITEOUT) :] in (".", ".."):  # `.wh..` would delete the directory holding it
            raise UnsafePathError(f"{source}: whiteout {ascii(name)[:120]} names no entry; refused", field=FIELD)
        hidden = posixpath.join(parent, base[len(WHITEOUT) :])
        _remove(confined(root, hidden, what="whiteout", source=source, field=FIELD))
        return
    path = confined(root, name, what="layer entry", source=source, field=FIELD)
    if m.isdir():
        if path.exists() and not path.is_dir():
            _remove(path)
        path.mkdir(parents=True, exist_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        _remove(path)
    if m.isfile():
        with tf.extractfile(m) as src, open(path, "wb") as out:  # type: ignore[union-attr]
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(path, 0o644 | (m.mode & 0o111))
    elif m.issym():
        os.symlink(_link_target(root, name, m.linkname, source), path)
    elif m.islnk():
        linked = m.linkname.replace("\\", "/").lstrip("/")  # a hard link names a path from the layer's root
        if unsafe_reason(linked):
            raise UnsafePathError(f"{source}: layer entry {ascii(name)[:120]} links outside the image", field=FIELD)
        original = confined(root, linked, what="hard link", source=source, field=FIELD)
        if not original.is_file():
            raise UnsafePathError(f"{source}: layer entry {ascii(name)[:120]} links to no file; refused", field=FIELD)
        shutil.copyfile(original, path)
    else:
        raise UnsafePathError(
            f"{source}: layer entry {ascii(name)[:120]} is not a file, directory or link (device or fifo); refused",
            field=FIELD,
        )


def _link_target(root: Path, name: str, link: str, source: str) -> str:
    """A symbolic link's target as a relative path that stays in `root` (an absolute one means the image's
    root, which `root` stands for); refused when it would lead outside."""
    link = link.replace("\\", "/")
    joined = link.lstrip("/") if link.startswith("/") else posixpath.join(posixpath.dirname(name), link)
    normal = posixpath.normpath(joined) if joined else "."
    if normal == ".." or normal.startswith("../") or "\0" in link:
        why = f"{source}: layer entry {ascii(name)[:120]} links outside the image; refused"
        raise UnsafePathError(why, field=FIELD)
    return posixpath.relpath(normal, posixpath.dirname(name) or ".")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def model_dir(root: Path, source: str) -> Path:
    """`root`/models when it holds a config.json (KServe modelcar's convention), else the one directory
    holding a config.json; SourceError when there is none or several."""
    if (root / "models" / "config.json").is_file():
        return root / "models"
    found = sorted(p.parent for p in root.rglob("config.json") if p.is_file() and not p.is_symlink())
    if len(found) == 1:
        return found[0]
    shown = ", ".join("/" + p.relative_to(root).as_posix().removeprefix(".") for p in found[:3])
    what = "no directory holds a config.json" if not found else f"several directories hold a config.json ({shown})"
    raise SourceError(f"{source}: no model in the image: /models has no config.json and {what}", field=FIELD)
