"""The reference OCI registry (Debian's `docker-registry`) on loopback for the oci:// tests, a raw pusher over
the distribution API (for layers crafted byte by byte), and a proxy that cuts blob transfers midway."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers import loopback_server

BINARY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR = "application/vnd.oci.image.layer.v1.tar"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """`docker-registry serve` on 127.0.0.1, storage under `root`, Basic auth when `user` is given."""

    def __init__(self, root: Path, user: str | None = None, password: str | None = None) -> None:
        self.root, self.user, self.password = root, user, password
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = root / "storage"
        auth = ""
        if user:
            line = subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True)
            (root / "htpasswd").write_text(line.stdout)
            auth = f"auth:\n  htpasswd:\n    realm: test\n    path: {root / 'htpasswd'}\n"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            f"http:\n  addr: {self.host}\n{auth}"
        )
        self.log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        self._wait()

    def _wait(self) -> None:
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {(self.root / 'registry.log').read_text()[-500:]}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
                return
            except urllib.error.HTTPError:  # 401: up, with auth
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()

    def blob_path(self, digest: str) -> Path:
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    # --- pushing over the distribution API -----------------------------------------------------------------

    def _request(self, method: str, url: str, body: bytes = b"", headers: dict | None = None) -> Any:
        request = urllib.request.Request(url, data=body if method != "GET" else None, method=method)
        for k, v in (headers or {}).items():
            request.add_header(k, v)
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        return urllib.request.urlopen(request, timeout=30)

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with self._request("POST", f"http://{self.host}/v2/{repo}/blobs/uploads/") as resp:
            location = resp.headers["Location"]
        if location.startswith("/"):
            location = f"http://{self.host}{location}"
        sep = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream"}
        self._request("PUT", f"{location}{sep}digest={digest}", data, headers).close()
        return digest

    def push_manifest(self, repo: str, ref: str, manifest: dict, media: str = OCI_MANIFEST) -> str:
        body = json.dumps(manifest).encode()
        self._request("PUT", f"http://{self.host}/v2/{repo}/manifests/{ref}", body, {"Content-Type": media}).close()
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def push_image(self, repo: str, tag: str, layers: list[bytes], media: str = TAR_GZIP) -> tuple[str, list[str]]:
        """An image of `layers` (tar or tar+gzip bytes); (manifest digest, layer digests)."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
        config_digest = self.push_blob(repo, config)
        digests = [self.push_blob(repo, layer) for layer in layers]
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                       "size": len(config)},
            "layers": [{"mediaType": media, "digest": d, "size": len(b)} for d, b in zip(digests, layers, strict=True)],
        }  # fmt: skip
        return self.push_manifest(repo, tag, manifest), digests


def tar_layer(entries: list[tuple[str, bytes | str | None]], gzip: bool = True, kind: bytes = tarfile.REGTYPE) -> bytes:
    """A layer: (name, bytes) a file, (name, None) a directory, (name, "target") a symbolic link."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gzip else "w") as tf:
        for name, content in entries:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif isinstance(content, str):
                info.type, info.linkname = tarfile.SYMTYPE, content
                tf.addfile(info)
            else:
                info.size, info.type = len(content), kind
                tf.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def model_layer(model_dir: Path, prefix: str = "models") -> bytes:
    """A modelcar layer: the model's files under /`prefix`/."""
    entries: list[tuple[str, bytes | str | None]] = [(prefix, None)]
    entries += [(f"{prefix}/{p.name}", p.read_bytes()) for p in sorted(model_dir.iterdir()) if p.is_file()]
    return tar_layer(entries)


class CuttingProxy:
    """Forwards loopback connections to `upstream`; while `cut` is set, a blob's answer is cut off after its
    headers and a few bytes of body, the connection closed as a network failure would."""

    def __init__(self, upstream: int) -> None:
        self.upstream, self.cut = upstream, True
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream), timeout=10) as up:
            request = b""
            while b"\r\n\r\n" not in request and (chunk := client.recv(65536)):
                request += chunk
            up.sendall(request)
            cutting = self.cut and b"/blobs/sha256:" in request.split(b"\r\n", 1)[0]
            sent = 0
            while chunk := up.recv(65536):
                if cutting:
                    head = chunk.find(b"\r\n\r\n")
                    client.sendall(chunk[: (head + 4 + 50) if head >= 0 else len(chunk)])
                    return
                client.sendall(chunk)
                sent += len(chunk)

    def close(self) -> None:
        self.server.close()


class BearerFront:
    """A token-auth front for `upstream` (as Docker Hub, Quay or Harbor answer): 401 with a Bearer challenge
    naming a token realm on the same server, which gives `token` for Basic `user`:`password`; requests with
    that token are forwarded to the registry."""

    def __init__(self, upstream: str, user: str, password: str, token: str) -> None:
        import http.server

        basic = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/token"):
                    front.token_queries.append(self.path)
                    ok = self.headers.get("Authorization") == basic
                    self._answer(200 if ok else 401, json.dumps({"token": token}).encode() if ok else b"{}")
                elif self.headers.get("Authorization") != f"Bearer {token}":
                    realm = f"http://127.0.0.1:{front.port}/token"
                    challenge = f'Bearer realm="{realm}",service="front",scope="repository:demo:pull"'
                    self._answer(401, b"{}", {"WWW-Authenticate": challenge})
                else:
                    request = urllib.request.Request(
                        f"http://{upstream}{self.path}", headers={"Accept": self.headers.get("Accept", "")}
                    )
                    with urllib.request.urlopen(request, timeout=10) as resp:
                        self._answer(resp.status, resp.read(), {"Content-Type": resp.headers.get("Content-Type", "")})

            def _answer(self, code: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.token_queries: list[str] = []
        self._server = contextlib.ExitStack()
        self.port = self._server.enter_context(loopback_server(Handler)).server_address[1]

    def close(self) -> None:
        self._server.close()
