"""Downloads over http(s): resume after a dropped connection, retries only for what may clear, checksums,
size cap; archives unpacked without letting a member out of the target directory."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, write_jsonl
from helpers import base_url, loopback_server
from lora_pipeline import sources
from lora_pipeline.errors import SourceError
from lora_pipeline.sources import Limits

BODY = b"".join(
    b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n' for _ in range(200)
)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)


class Script:
    """What the server does, request by request: "drop" (half the body, then close), "500", or "ok"."""

    def __init__(self, *steps: str) -> None:
        self.steps = list(steps)
        self.ranges: list[str | None] = []  # the Range header of each GET


def _handler(script: Script) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            script.ranges.append(self.headers.get("Range"))
            step = script.steps.pop(0) if script.steps else "ok"
            if step == "500":
                self.send_error(500)
                return
            start = 0
            rng = self.headers.get("Range")
            if rng and self.headers.get("If-Range") == '"v1"':
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
            else:
                self.send_response(200)
            self.send_header("ETag", '"v1"')
            self.send_header("Content-Length", str(len(BODY) - start))
            self.end_headers()
            if step == "drop":
                self.wfile.write(BODY[start : len(BODY) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(BODY[start:])

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[Script], str]]:
    with contextlib.ExitStack() as servers:

        def start(script: Script) -> str:
            return f"{base_url(servers.enter_context(loopback_server(_handler(script))))}/data/chat.jsonl"

        yield start


@pytest.mark.integration
def test_dropped_connection_is_resumed_with_range(serve, tmp_path: Path) -> None:  # noqa: ANN001
    script = Script("drop")
    path = sources.fetch(serve(script), tmp_path)
    assert path.read_bytes() == BODY
    assert script.ranges == [None, f"bytes={len(BODY) // 2}-"]  # the second request asked for the rest only


@pytest.mark.integration
def test_two_server_errors_then_success_with_checksum(serve, tmp_path: Path) -> None:  # noqa: ANN001
    script = Script("500", "500")
    digest = hashlib.sha256(BODY).hexdigest()
    path = sources.fetch(f"{serve(script)}#sha256={digest}", tmp_path)
    assert path.read_bytes() == BODY and len(script.ranges) == 3


@pytest.mark.integration
def test_checksum_mismatch_is_one_line(serve, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(
        SourceError, match=r"^dataset.data_uri: checksum mismatch: .* has sha256 [0-9a-f]{64}, expected 0+$"
    ):
        sources.fetch(serve(Script()), tmp_path, Limits(sha256="0" * 64))


@pytest.mark.integration
def test_size_cap_stops_the_download(serve, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(SourceError, match="larger than dataset.max_bytes"):
        sources.fetch(serve(Script()), tmp_path, Limits(max_bytes=1000))
    assert not any(p.suffix == ".jsonl" for p in tmp_path.iterdir())


def test_unknown_host_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def no_such_host(*args: object, **kwargs: object) -> None:
        calls.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(SourceError, match=r"cannot resolve host: https://no-such-host.invalid/x.jsonl \(Name or"):
        sources.fingerprint("https://no-such-host.invalid/x.jsonl")
    assert calls == ["no-such-host.invalid"]


def test_tls_to_a_plain_http_server_is_not_retried(tmp_path: Path) -> None:
    connections = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)

        def answer() -> None:  # an HTTP server's reply to a TLS hello, on every connection
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                connections.append(conn)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                conn.close()

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(SourceError, match="TLS handshake failed"):
            sources.fetch(f"https://127.0.0.1:{listener.getsockname()[1]}/x.jsonl", tmp_path)
    assert len(connections) == 1


# --- archives ---------------------------------------------------------------------------------------------


def test_zip_and_tar_gz_are_unpacked(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:4]).read_bytes()
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as zf:
        zf.writestr("dir/chat.jsonl", data)
    with tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "chat.jsonl", arcname="dir/chat.jsonl")
    for name in ("d.zip", "d.tar.gz"):
        out = sources.fetch(str(tmp_path / name), tmp_path / f"dest-{name}")
        assert (out / "dir" / "chat.jsonl").read_bytes() == data
        assert sources.fingerprint(str(tmp_path / name)).startswith("sha256:")


def _tar(path: Path, *members: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            tf.addfile(m, io.BytesIO(b"x" * m.size) if m.isfile() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("../evil.jsonl"), "is outside the archive"),
        (_member("/tmp/evil.jsonl"), "is outside the archive"),
        (_member("data/link", tarfile.SYMTYPE, "../../outside"), "links outside the archive"),
        (_member("data/abs", tarfile.SYMTYPE, "/etc/passwd"), "links outside the archive"),
        (_member("data/hard", tarfile.LNKTYPE, "../outside"), "links outside the archive"),
    ],
)
def test_unsafe_tar_members_are_refused_before_anything_is_written(
    tmp_path: Path, member: tarfile.TarInfo, why: str
) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", _member("data/ok.jsonl"), member)
    with pytest.raises(SourceError, match=f"unsafe archive evil.tar.gz: member .* {why}"):
        sources.fetch(str(archive), tmp_path / "dest")
    assert list((tmp_path / "dest" / "unpacked").iterdir()) == []
    assert not (tmp_path / "evil.jsonl").exists()


def test_unsafe_zip_members_are_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "trav.zip", "w") as zf:
        zf.writestr("../evil.jsonl", "x")
    with pytest.raises(SourceError, match="member '../evil.jsonl' is outside the archive"):
        sources.fetch(str(tmp_path / "trav.zip"), tmp_path / "a")
    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        info = zipfile.ZipInfo("data/link")
        info.external_attr = 0o120777 << 16  # a symbolic link, to a place outside
        zf.writestr(info, "../../etc/passwd")
    with pytest.raises(SourceError, match="member 'data/link' points outside the archive"):
        sources.fetch(str(tmp_path / "link.zip"), tmp_path / "b")
    assert not (tmp_path / "evil.jsonl").exists()


def test_archive_bomb_is_stopped_by_the_size_cap(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "big.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.jsonl", b"\n" * 1_000_000)  # compresses to about 1 KB
    with pytest.raises(SourceError, match="unpacks to 1000000 bytes, more than dataset.max_bytes"):
        sources.fetch(str(tmp_path / "big.zip"), tmp_path / "dest", Limits(max_bytes=100_000))
