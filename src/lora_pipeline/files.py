"""Files every stage writes and reads: atomic outputs (a stage's directory and its JSON files appear complete
or not at all), cache entries, paths from fetched content confined to their directory, streamed sha256 digests,
JSON/JSONL, and the run directory's lock."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lora_pipeline.errors import DataError


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it replaces `out` in one rename.

    On failure the temporary directory is removed and whatever `out` held before is left untouched.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out.parent, f".{out.name}.tmp-")
    _restore_swapped_out(out)
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{out.name}.tmp-"), dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(owned_prefix(f".{out.name}.old-") + "swap")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a path with `path`'s name, in a fresh temporary directory beside it, for a writer that opens the
    file itself (kfp's compiler); on success it replaces `path` in one rename. A failed or killed write leaves
    whatever `path` held before; a killed one's directory is removed by the next write of the same file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(path.parent, f".{path.name}.tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{path.name}.tmp-"), dir=path.parent))
    try:
        yield tmp / path.name  # the same name: a writer may check its suffix (.yaml)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_tree(src: Path, dest: Path) -> None:
    """Copy the directory `src` to `dest` as hard links (a copy where the filesystem has none). Outputs taken
    from a work directory are linked, not moved: until the output's rename, a killed run's work is whole."""

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, copy_function=link)


def owned_prefix(prefix: str) -> str:
    """A temporary directory's name prefix that records its owner (pid and host), so that the next run can tell
    a killed run's leftovers from a live process's work: `PREFIX<pid>-<host>-`."""
    return f"{prefix}{os.getpid()}-{_HOST}-"


def _restore_swapped_out(out: Path) -> None:
    """A process killed between atomic_dir's two renames left the previous `out` moved aside, and no `out`:
    put back, so an earlier output survives; moved-aside copies that are not needed are removed."""
    for old in _stale_temp(out.parent, f".{out.name}.old-"):
        if out.exists() or out.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, out)


def remove_stale_temp(folder: Path, prefix: str) -> None:
    """Remove the directories `owned_prefix(prefix)` made in `folder` whose owner process is gone (killed, or
    its cleanup never ran). Another host's, a live process's, and names without an owner are left alone."""
    for entry in _stale_temp(folder, prefix):
        shutil.rmtree(entry, ignore_errors=True)


def _stale_temp(folder: Path, prefix: str) -> list[Path]:
    try:
        entries = list(Path(folder).glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return []
    stale = []
    for entry in entries:
        owner = re.match(r"(\d+)-([0-9a-f]{8})-", entry.name[len(prefix) :])
        if owner and owner[2] == _HOST and not _alive(int(owner[1])) and entry.is_dir() and not entry.is_symlink():
            stale.append(entry)
    return stale


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; a pid the OS cannot hold
        return True
    return True


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def confined(base: Path, relative: object, *, what: str, source: str, field: str = "dataset.data_uri",
             links_to: Path | None = None) -> Path:  # fmt: skip
    """`base`/`relative` for a path read from fetched content, refused unless it stays inside `base`.

    Every path that data names (save_to_disk metadata, a dataset card, an object key, an archive member) goes
    through here before it is opened or linked: absolute paths, drive letters, `..`, NUL and control
    characters are refused as written, and the resolved path (symbolic links followed) must lie in `base`, or
    in `links_to` for a cache whose files are links into a blob store (the Hugging Face cache). `what` names
    the field of the content, `source` the archive or URI (never a temporary directory); UnsafePathError.
    """
    from lora_pipeline.errors import UnsafePathError

    def refuse(why: str) -> UnsafePathError:
        shown = ascii(relative)[:120] if isinstance(relative, str) else type(relative).__name__
        return UnsafePathError(f"{source}: {what} {shown} {why}; refused", field=field)

    why = unsafe_reason(relative)
    if why:
        raise refuse(why)
    normal = posixpath.normpath(str(relative).replace("\\", "/"))
    if normal == ".":
        raise refuse("names the data's directory itself, not a file in it")
    path = Path(base) / normal
    try:
        real, roots = path.resolve(), [Path(base).resolve(), *([Path(links_to).resolve()] if links_to else [])]
    except (OSError, RuntimeError, ValueError):  # a symbolic link loop, a name too long
        raise refuse("cannot be resolved") from None
    if not any(real.is_relative_to(root) and real != root for root in roots):
        raise refuse("leads outside the data's directory (a symbolic link)")
    return path


def unsafe_reason(relative: object) -> str | None:
    """Why `relative`, a path read from data, could reach outside its directory as written; None if it cannot.

    The checks on the text alone, shared by confined() and by archives before any member is written."""
    if not isinstance(relative, str) or not relative.strip():
        return "is not a path"
    if any(ord(c) < 32 or ord(c) == 127 for c in relative):
        return "holds a NUL or control character"
    text = relative.replace("\\", "/")
    normal = posixpath.normpath(text)  # "./C:" is a drive letter too, once normalised
    if any(t.startswith("/") or t[1:2] == ":" for t in (text, normal)):
        return "is an absolute path, outside the data's directory"
    if ".." in text.split("/"):
        return "climbs out of the data's directory (..)"
    return None


@contextlib.contextmanager
def cache_work_dir(target: Path) -> Iterator[Path]:
    """A temporary directory beside the cache entry `target`, to fill and then `place_complete`: a fill that is
    interrupted leaves nothing that is used, and the leftovers of dead processes are removed here."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(target.parent, f".{target.name}.tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=owned_prefix(f".{target.name}.tmp-"), dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place_complete(done: Path, target: Path, note: str) -> None:
    """Mark `done` complete (`.complete`, written last) and rename it to `target`, replacing an incomplete copy
    a killed process left there; a cache entry counts only with its mark."""
    (done / ".complete").write_text(note + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(done, target)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks: data files and weights can be larger than memory."""
    return hash_file_into(hashlib.sha256(), path).hexdigest()


def tree_sha256(root: Path, files: Iterable[Path] | None = None) -> str:
    """The hex sha256 over a directory's files (all of them, or `files` under it): each one's path relative to
    `root` ('/'-separated, sorted) and the sha256 of its bytes. Where the directory is, mtimes and permissions
    do not count: the same content anywhere has the same digest."""
    root = Path(root)
    chosen = root.rglob("*") if files is None else files
    entries = sorted((p.relative_to(root).as_posix(), p) for p in chosen if p.is_file())
    digest = hashlib.sha256()
    for rel, path in entries:
        digest.update(rel.encode("utf-8", "surrogateescape") + b"\0" + bytes.fromhex(sha256_file(path)) + b"\n")
    return digest.hexdigest()


def hash_file_into(digest: Any, path: Path) -> Any:
    """Feed a file's bytes into `digest` in blocks (for digests over several files and options); returns it."""
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest


_BLOCK = 1 << 20


def write_text_atomic(text: str, path: Path) -> Path:
    """Temp file in the same directory + fsync + os.replace, so readers never see a half-written file.

    The file is created 0600 (mkstemp): run records may name private paths, so they are not shared by default.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(obj: Any, path: Path) -> Path:
    # default=str: configs carry Paths and similar; better a string in the JSON than a crash at the end of a run.
    return write_text_atomic(json.dumps(obj, indent=2, default=str) + "\n", path)


def package_versions(names: Iterable[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def write_jsonl(rows: Iterable[dict], path: Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


class UnreadableRecord(DataError, ValueError):
    """A JSON file this pipeline wrote (a stage's rows, metrics, a record) that no longer parses as it wrote it:
    edited by hand, truncated. One line naming the file (and row); a ValueError, so the callers that handle a
    bad file themselves still do."""


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON Lines file a stage wrote, each a JSON object."""
    rows, number = [], 0
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):  # noqa: B007 (the error names it)
                if line.strip():
                    rows.append(_object(json.loads(line), f"{path}:{number}"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UnreadableRecord(f"{path}:{max(number, 1)}: not valid JSON; fix or delete the file") from None
    return rows


def read_json(path: Path) -> Any:
    """A JSON object from a file a stage or a run wrote."""
    try:
        with open(path, encoding="utf-8") as fh:
            return _object(json.load(fh), str(path))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UnreadableRecord(f"{path}: not valid JSON; fix or delete the file") from None


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise UnreadableRecord(f"{where}: expected a JSON object, got {type(value).__name__}; fix or delete the file")
    return value


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock file (flock: released by the kernel even on kill -9), or fail at once.

    The file records the holder's pid so the second process can name it. It is removed on release; a
    lock taken on a file that another process unlinked meanwhile is retaken on the new file.
    """
    import fcntl

    from lora_pipeline.errors import LockedError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{what} is in use by another lora-pipeline process (pid {holder})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
