"""A stand-in Hugging Face Hub on loopback: the few endpoints `HfApi.create_repo` and `upload_folder` call with
xet off (create a repo, ask each file's upload mode, commit). Every file is answered "regular", so its bytes
arrive base64-encoded in the commit itself and no LFS endpoint is needed.

In-memory, one process; it records each request's method, path and Authorization header, answers a queued
list of failure statuses first (`fail_next`), and stops by itself after `lifetime` seconds.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

from helpers import base_url, loopback_server

_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"


class HubStandIn:
    def __init__(self, lifetime: float = 60) -> None:
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.fail_next: list[int] = []
        self._server = contextlib.ExitStack()
        self._deadline = threading.Timer(lifetime, self.stop)
        self._deadline.daemon = True

    def __enter__(self) -> HubStandIn:
        self.url = base_url(self._server.enter_context(loopback_server(self._handler())))
        self._deadline.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._deadline.cancel()
        self._server.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                if hub.fail_next:
                    # echoes the credentials, as a careless proxy might: the caller must not print them
                    auth = self.headers.get("Authorization")
                    return self._json({"error": f"stand-in failure for {auth}"}, hub.fail_next.pop(0))
                if self.path == "/api/repos/create":
                    return self._create(json.loads(body))
                if self.path == "/api/validate-yaml":  # a README.md's model card metadata
                    return self._json({"errors": [], "warnings": []})
                if m := re.fullmatch(_REPO + r"/preupload/(?P<rev>[^/]+)", self.path):
                    files = json.loads(body)["files"]
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._json({"files": modes, "commitOid": "0" * 40})
                if m := re.fullmatch(_REPO + r"/commit/(?P<rev>[^/]+)", self.path):
                    return self._commit(m["repo"], body)
                self._json({"error": f"stand-in: no {self.path}"}, 404)

            def do_GET(self) -> None:  # noqa: N802
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                self._json({"error": f"stand-in: no {self.path}"}, 404)

            def _create(self, spec: dict[str, Any]) -> None:
                repo = f"{spec['organization']}/{spec['name']}" if spec.get("organization") else spec["name"]
                private = bool(spec.get("private")) or spec.get("visibility") == "private"
                hub.repos.setdefault(repo, {"private": private, "files": {}})
                self._json({"url": f"{hub.url}/{repo}", "name": repo})

            def _commit(self, repo: str, body: bytes) -> None:
                if repo not in hub.repos:
                    return self._json({"error": "Repository not found"}, 404)
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        value = item["value"]
                        hub.repos[repo]["files"][value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] != "header":
                        return self._json({"error": f"stand-in: no {item['key']} operations"}, 400)
                self._json({"commitUrl": f"{hub.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})

            def _json(self, obj: Any, status: int = 200) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def wait_until(predicate: Any, timeout: float = 5) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False
