"""A stand-in Kubeflow Model Registry on loopback, built from the real server's published OpenAPI documents
(reduced: tests/data/model_registry/<api>.json, each naming its upstream source): it serves one API version
(`v1alpha3` or `v1`) under that version's prefix, answers 404 under any other, and validates every request
body and every response it sends against that document's schemas. Anything that does not match is recorded
in `invalid` (tests assert it stays empty), so the stand-in catches the client disagreeing with the server.

Not a registry implementation: in-memory, one process, just enough for the real client to run against.
It records every request, answers a queued list of failure statuses first (`fail_next`), checks a bearer
token when one is set, and stops by itself after `lifetime` seconds even if a test forgets it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import threading
import time
from functools import cache
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from jsonschema import validators
from openapi_schema_validator import OAS30Validator

from helpers import base_url, loopback_server

DOCS = Path(__file__).parent / "data" / "model_registry"
APIS = ("v1alpha3", "v1")


@cache
def document(api: str) -> dict[str, Any]:
    return json.loads((DOCS / f"{api}.json").read_text())


def _one_of(validator: Any, one_of: Any, instance: Any, schema: dict) -> Any:
    """oneOf with an OpenAPI discriminator picks the mapped schema (jsonschema ignores discriminators, and
    ModelArtifact and DocArtifact bodies look alike apart from it)."""
    disc = schema.get("discriminator")
    if disc and isinstance(instance, dict) and instance.get(disc["propertyName"]) in disc.get("mapping", {}):
        yield from validator.descend(instance, {"$ref": disc["mapping"][instance[disc["propertyName"]]]})
        return
    yield from OAS30Validator.VALIDATORS["oneOf"](validator, one_of, instance, schema)


_Validator = validators.extend(OAS30Validator, {"oneOf": _one_of})


def schema_errors(api: str, schema: dict[str, Any], instance: Any) -> list[str]:
    """What does not match `schema` (refs into the document), plus properties that no schema declares."""
    doc = document(api)
    root = {**schema, "components": doc["components"]}
    errors = _Validator(root).iter_errors(instance)
    found = [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors]
    declared = _properties(doc, schema)
    if isinstance(instance, dict) and declared is not None and (extra := set(instance) - declared):
        found.append(f"undeclared fields {sorted(extra)}")
    return found


def _properties(doc: dict, schema: dict) -> set[str] | None:
    """Every property name a schema declares through $ref/allOf; None when it may hold any (oneOf, no props)."""
    if "$ref" in schema:
        section, name = schema["$ref"].split("/")[-2:]
        return _properties(doc, doc["components"][section][name])
    if "oneOf" in schema or "anyOf" in schema:
        return None
    names = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        more = _properties(doc, part)
        if more is None:
            return None
        names |= more
    return names if names or schema.get("allOf") else None


class StandIn:
    def __init__(
        self, token: str | None = None, lifetime: float = 60, tls: tuple[Path, Path] | None = None, api: str = "v1"
    ) -> None:
        self.api, self.prefix = api, f"/api/model_registry/{api}"
        self.routes = _routes(api)
        self.token = token
        self.models: dict[str, dict] = {}  # id -> RegisteredModel
        self.versions: dict[str, dict] = {}
        self.artifacts: dict[str, dict] = {}  # id -> ModelArtifact, with "_version" = its version id
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.invalid: list[str] = []  # requests and responses that the OpenAPI document refuses: must stay empty
        self.auth_headers: list[str | None] = []
        self.fail_next: list[int] = []
        self._ids = itertools.count(1)
        self._tls = tls  # (certificate, key): serve https
        self._server = contextlib.ExitStack()
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    def __enter__(self) -> StandIn:
        server = self._server.enter_context(loopback_server(_handler(self), tls=self._tls))
        self.port, self.url = server.server_address[1], base_url(server)
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._timer.cancel()
        self._server.close()

    # --- the REST resources -------------------------------------------------------------------------

    def stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        now = str(int(time.time() * 1000))
        return {**body, "id": str(next(self._ids)), "createTimeSinceEpoch": now, "lastUpdateTimeSinceEpoch": now}

    def serve(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """Route by the document's path templates; check the request body against it, then the response."""
        for template, pattern in self.routes.items():
            if (match := pattern.fullmatch(path)) and method.lower() in document(self.api)["paths"][template]:
                operation = document(self.api)["paths"][template][method.lower()]
                break
        else:
            return 404, _error(404, f"stand-in has no {method} {path}")
        if "requestBody" in operation:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            self.invalid += [f"{method} {path} request: {e}" for e in schema_errors(self.api, schema, body)]
        status, answer = self.handle(method, template[len(self.prefix) :], match.groupdict(), query, body)
        response = operation["responses"].get(str(status))
        if response is None:
            self.invalid.append(f"{method} {path}: the document has no {status} response")
            return status, answer
        if "$ref" in response:
            response = document(self.api)["components"]["responses"][response["$ref"].split("/")[-1]]
        schema = response["content"]["application/json"]["schema"]
        self.invalid += [f"{method} {path} {status} response: {e}" for e in schema_errors(self.api, schema, answer)]
        return status, answer

    def handle(self, method: str, route: str, ids: dict, query: dict[str, str], body: Any) -> tuple[int, Any]:
        one = _find_one
        if (method, route) == ("GET", "/registered_models"):
            items = list(self.models.values())[: int(query.get("pageSize", 100))]
            return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
        if (method, route) == ("GET", "/registered_model"):
            return one(m for m in self.models.values() if m["name"] == query.get("name"))
        if (method, route) == ("POST", "/registered_models"):
            if any(m["name"] == body["name"] for m in self.models.values()):
                return 409, _error(409, "registered model exists")
            model = {"state": "LIVE", **self.stamp(body)}
            self.models[model["id"]] = model
            return 201, model
        if (method, route) == ("GET", "/model_version"):
            parent, name = query.get("parentResourceId"), query.get("name")
            return one(v for v in self.versions.values() if v["registeredModelId"] == parent and v["name"] == name)
        if (method, route) == ("POST", "/model_versions"):
            parent = body["registeredModelId"]
            if parent not in self.models:
                return 400, _error(400, "no such registered model")
            if any(v["registeredModelId"] == parent and v["name"] == body["name"] for v in self.versions.values()):
                return 409, _error(409, "model version exists")
            version = {"state": "LIVE", **self.stamp(body)}
            self.versions[version["id"]] = version
            return 201, version
        if (method, route) == ("GET", "/model_artifact"):
            parent, name = query.get("parentResourceId"), query.get("name")
            return one(self._public(a) for a in self.artifacts.values() if (a["_version"], a["name"]) == (parent, name))
        return self._version_artifacts(method, ids.get("modelversionId", ""), body)

    def _version_artifacts(self, method: str, version_id: str, body: Any) -> tuple[int, Any]:
        if version_id not in self.versions:
            return 404, _error(404, "no such model version")
        if method == "GET":
            items = [self._public(a) for a in self.artifacts.values() if a["_version"] == version_id]
            return 200, {"items": items, "nextPageToken": "", "pageSize": len(items), "size": len(items)}
        if any(a["_version"] == version_id and a["name"] == body.get("name") for a in self.artifacts.values()):
            return 409, _error(409, "artifact exists")  # the real server's unique (version, name)
        artifact = {**self.stamp(body), "state": "LIVE", "artifactType": "model-artifact"}
        self.artifacts[artifact["id"]] = {**artifact, "_version": version_id}
        return 200, artifact

    @staticmethod
    def _public(artifact: dict) -> dict:
        return {k: v for k, v in artifact.items() if k != "_version"}


def _routes(api: str) -> dict[str, re.Pattern[str]]:
    """The document's path templates as regexes, `{name}` matching one segment."""
    return {t: re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(t))) for t in document(api)["paths"]}


def _error(status: int, message: str) -> dict[str, str]:
    return {"code": str(status), "message": message}


def _find_one(found: Any) -> tuple[int, Any]:
    items = list(found)
    if not items:
        return 404, _error(404, "not found")
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
                self._send(standin.fail_next.pop(0), _error(503, "try later"))
                return
            if standin.token and self.headers.get("Authorization") != f"Bearer {standin.token}":
                self._send(401, _error(401, "unauthorized"))
                return
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            body = json.loads(raw) if raw else None
            self._send(*standin.serve(method, parts.path, query, body))

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
