""".zip and .tar(.gz) sources, unpacked safely: every member is checked before anything is written.

Refused, for the whole archive: absolute member names and names with `..` (path traversal), links whose
target lies outside the unpack directory, device files and FIFOs, and a total size above the size cap (an
archive bomb). tar members are then extracted with Python's "data" filter as a second line of defence.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from pathlib import Path

from lora_pipeline.errors import SourceError
from lora_pipeline.files import unsafe_reason
from lora_pipeline.sources import FIELD

SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SUFFIXES)


def unpack(archive: Path, target: Path, max_bytes: int = 0) -> Path:
    """Unpack `archive` into `target` (created) and return `target`; SourceError if a member is unsafe."""
    target.mkdir(parents=True, exist_ok=False)
    try:
        if archive.name.lower().endswith(".zip"):
            _unpack_zip(archive, target, max_bytes)
        else:
            _unpack_tar(archive, target, max_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise SourceError(f"{archive.name} is not a readable archive ({exc})", field=FIELD) from None
    return target


def _inside(name: str) -> bool:
    """A relative member path that stays inside the unpack directory (the rules every path from data obeys)."""
    return unsafe_reason(name) is None


def _refuse(archive: Path, name: str, why: str) -> SourceError:
    return SourceError(f"unsafe archive {archive.name}: member {name[:100]!r} {why}", field=FIELD)


def _check_size(archive: Path, total: int, max_bytes: int) -> None:
    if max_bytes and total > max_bytes:
        raise SourceError(
            f"{archive.name} unpacks to {total} bytes, more than dataset.max_bytes ({max_bytes})", field=FIELD
        )


def _unpack_zip(archive: Path, target: Path, max_bytes: int) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for info in members:
            if not _inside(info.filename):
                raise _refuse(archive, info.filename, "is outside the archive (absolute or ..)")
            if stat.S_ISLNK(info.external_attr >> 16):
                # zipfile would write the link as a small file holding its target; a link is never data here.
                link = zf.read(info).decode("utf-8", "replace")
                where = "points outside the archive" if not _inside(_join(info.filename, link)) else "is a link"
                raise _refuse(archive, info.filename, where)
        _check_size(archive, sum(i.file_size for i in members), max_bytes)
        zf.extractall(target)


def _unpack_tar(archive: Path, target: Path, max_bytes: int) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            if not _inside(m.name):
                raise _refuse(archive, m.name, "is outside the archive (absolute or ..)")
            if m.issym() and not _inside(_join(m.name, m.linkname)):
                raise _refuse(archive, m.name, f"links outside the archive ({m.linkname[:100]!r})")
            if m.islnk() and not _inside(m.linkname):
                raise _refuse(archive, m.name, f"links outside the archive ({m.linkname[:100]!r})")
            if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise _refuse(archive, m.name, "is not a file, directory or link")
        _check_size(archive, sum(m.size for m in members if m.isfile()), max_bytes)
        tf.extractall(target, members=members, filter="data")


def _join(member: str, link: str) -> str:
    """A symbolic link's target, relative to the archive root ('' when it is absolute: never inside)."""
    if link.startswith("/"):
        return ""
    return posixpath.join(posixpath.dirname(member.replace("\\", "/")), link)
