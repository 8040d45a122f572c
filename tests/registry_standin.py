"""A stand-in Kubeflow Model Registry on loopback: the REST endpoints that the `model-registry` client calls
when registering, with request bodies validated against the client's own OpenAPI models (mr_openapi).

Not a registry implementation: in-memory, one process, just enough for the real client to run against.
It records every request, answers a queued list of failure statuses first (`fail_next`), checks a bearer
token when one is set, and stops by itself after `lifetime` seconds even if a test forgets it.
"""

from __future__ import annotations

import itertools
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mr_openapi.models import (
    Artifact,
    ModelArtifact,
    ModelVersion,
    ModelVersionCreate,
    RegisteredModel,
    RegisteredModelCreate,
)

PREFIX = "/api/model_registry/v1"


class StandIn:
    def __init__(self, token: str | None = None, lifetime: float = 60, tls: tuple[Path, Path] | None = None) -> None:
        self.token = token
        self.models: dict[str, dict] = {}  # id -> RegisteredModel dict
        self.versions: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}  # id -> ModelArtifact dict, with "_version" = its version id
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.invalid: list[str] = []  # request bodies the OpenAPI models refused: must stay empty
        self.auth_headers: list[str | None] = []
        self.fail_next: list[int] = []
        self._ids = itertools.count(1)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        if tls:  # (certificate, key): serve https
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> StandIn:
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    # --- the REST resources -------------------------------------------------------------------------

    def new_id(self) -> str:
        return str(next(self._ids))

    def stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        return {**body, "id": self.new_id(), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        one = _find_one
        if method == "GET" and path == "/registered_models":
            items = list(self.models.values())[: int(query.get("pageSize", 100))]
            return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
        if method == "GET" and path == "/registered_model":
            return one(m for m in self.models.values() if m["name"] == query.get("name"))
        if method == "POST" and path == "/registered_models":
            self.validate(RegisteredModelCreate, body)
            if any(m["name"] == body["name"] for m in self.models.values()):
                return 409, {"code": "409", "message": "registered model exists"}
            model = RegisteredModel.from_dict(self.stamp(body)).to_dict()
            self.models[model["id"]] = model
            return 201, model
        if method == "GET" and path == "/model_version":
            parent, name = query.get("parentResourceId"), query.get("name")
            return one(v for v in self.versions.values() if v["registeredModelId"] == parent and v["name"] == name)
        if method == "POST" and path == "/model_versions":
            self.validate(ModelVersionCreate, body)
            if body["registeredModelId"] not in self.models:
                return 400, {"code": "400", "message": "no such registered model"}
            parent = body["registeredModelId"]
            if any(v["registeredModelId"] == parent and v["name"] == body["name"] for v in self.versions.values()):
                return 409, {"code": "409", "message": "model version exists"}
            version = ModelVersion.from_dict(self.stamp(body)).to_dict()
            self.versions[version["id"]] = version
            return 201, version
        if method == "GET" and path == "/model_artifact":
            parent, name = query.get("parentResourceId"), query.get("name")
            found = [a for a in self.artifacts.values() if a["_version"] == parent and a["name"] == name]
            return one({k: v for k, v in a.items() if k != "_version"} for a in found)
        if method == "POST" and path.startswith("/model_versions/") and path.endswith("/artifacts"):
            version_id = path.split("/")[2]
            if version_id not in self.versions:
                return 404, {"code": "404", "message": "no such model version"}
            wrapped = Artifact.from_dict(body)  # the oneOf wrapper, as the client sends it
            if not isinstance(wrapped.actual_instance, ModelArtifact):
                self.invalid.append(f"artifact of type {type(wrapped.actual_instance).__name__}")
            self.validate(ModelArtifact, body)
            artifact = ModelArtifact.from_dict({**self.stamp(body), "state": "LIVE"}).to_dict()
            self.artifacts[artifact["id"]] = {**artifact, "_version": version_id}
            return 200, artifact
        return 404, {"code": "404", "message": f"stand-in has no {method} {path}"}

    def validate(self, model: type, body: Any) -> None:
        """The body parses as the client's own model, with no field that the model does not declare."""
        if not isinstance(body, dict):
            self.invalid.append(f"{model.__name__}: not an object")
            return
        known = {f.alias or name for name, f in model.model_fields.items()}
        extra = set(body) - known
        if extra:
            self.invalid.append(f"{model.__name__}: unknown fields {sorted(extra)}")
        try:
            model.from_dict(body)
        except Exception as exc:  # pydantic's ValidationError: record it, the test asserts none
            self.invalid.append(f"{model.__name__}: {exc}")


def _find_one(found: Any) -> tuple[int, Any]:
    items = list(found)
    if not items:
        return 404, {"code": "404", "message": "not found"}
    return 200, items[0]


def _handler(standin: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet test output
            pass

        def _serve(self, method: str) -> None:
            parts = urlsplit(self.path)
            standin.requests.append((method, parts.path))
            standin.auth_headers.append(self.headers.get("Authorization"))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if standin.fail_next:
                self._send(standin.fail_next.pop(0), {"code": "unavailable", "message": "try later"})
                return
            if standin.token and self.headers.get("Authorization") != f"Bearer {standin.token}":
                self._send(401, {"code": "401", "message": "unauthorized"})
                return
            if not parts.path.startswith(PREFIX):
                self._send(404, {"code": "404", "message": "not found"})
                return
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            body = json.loads(raw) if raw else None
            status, answer = standin.handle(method, parts.path[len(PREFIX) :], query, body)
            self._send(status, answer)

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_PATCH(self) -> None:  # noqa: N802
            self._serve("PATCH")

    return Handler
