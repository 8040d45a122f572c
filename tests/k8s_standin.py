"""A stand-in Kubernetes API server on loopback: just what a TrainJob run asks of a cluster.

It serves the TrainJob CRD of one Kubeflow Trainer release (tests/data/trainjob_crds, reduced from upstream)
and validates every TrainJob it is sent against that CRD's own openAPIV3Schema, as the API server does (an
unknown field, which the real server would prune or refuse, is refused here: a patch silently dropped is a
bug). It then plays the job's status, one step per read (`script`: Created, Running, Complete or Failed),
lists node 0's pod once the job runs, serves its log, and records deletions. `token` requires that bearer
token; `tls` = (certfile, keyfile) serves HTTPS.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import jsonschema

from helpers import base_url, loopback_server

CRDS = Path(__file__).parent / "data" / "trainjob_crds"
TRAINJOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/?]+))?")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/?]+)/log)?")


def crd(release: str) -> dict[str, Any]:
    return json.loads((CRDS / f"trainjobs-{release}.json").read_text())


def json_schema(node: Any) -> Any:
    """The CRD's structural schema as JSON Schema: objects with properties accept no others."""
    if isinstance(node, list):
        return [json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "format"}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validator(release: str) -> jsonschema.Draft7Validator:
    version = next(v for v in crd(release)["spec"]["versions"] if v["name"] == "v1alpha1")
    return jsonschema.Draft7Validator(json_schema(version["schema"]["openAPIV3Schema"]))


@dataclass
class KubeStandin:
    release: str  # a Trainer release under tests/data/trainjob_crds
    script: tuple[str, ...] = ("Created", "Running", "Complete")
    failure: tuple[str, str] = ("JobSetFailed", "jobset failed: node-1 exited with code 1")
    log: str = "step 1 loss 2.0\nstep 2 loss 1.5\n"
    token: str | None = None
    tls: tuple[str, str] | None = None
    on_running: Callable[[dict[str, Any]], None] | None = None  # what the nodes do (write their output)
    created: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unauthorized: int = 0
    _step: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> KubeStandin:
        self._validator = validator(self.release)
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                standin._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                standin._handle(self, "POST")

            def do_DELETE(self) -> None:  # noqa: N802
                standin._handle(self, "DELETE")

        self._server = contextlib.ExitStack()
        self.url = base_url(self._server.enter_context(loopback_server(Handler, tls=self.tls)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.close()

    # --- requests -------------------------------------------------------------------------------------------

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        if self.token is not None and h.headers.get("Authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return _send(h, 401, _status(401, "Unauthorized", "Unauthorized"))
        path = h.path.split("?", 1)[0]
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length) or b"null") if length else None
        if path == "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/trainjobs.trainer.kubeflow.org":
            return _send(h, 200, crd(self.release))
        if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return _send(h, 200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": {"name": "x"},
                                  "data": {"kubeflow_trainer_version": self.release}})  # fmt: skip
        if m := TRAINJOBS.match(path):
            return self._trainjobs(h, method, m.group(1), m.group(2), body)
        if m := PODS.match(path):
            return self._pods(h, m.group(1), m.group(2), h.path)
        _send(h, 404, _status(404, "NotFound", f"no route {path}"))

    def _trainjobs(self, h: Any, method: str, ns: str, name: str | None, body: Any) -> None:
        if method == "POST":
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in self._validator.iter_errors(body)]
            if errors:
                self.rejected.append("; ".join(errors))
                return _send(h, 422, _status(422, "Invalid", f"TrainJob is invalid: {'; '.join(errors)}"[:2000]))
            body["metadata"].update(namespace=ns, creationTimestamp="2026-01-01T00:00:00Z")
            self.created.append(body)
            self._step[body["metadata"]["name"]] = -1
            return _send(h, 201, body)
        job = next((j for j in self.created if j["metadata"]["name"] == name), None)
        if job is None or name in self.deleted:
            return _send(h, 404, _status(404, "NotFound", f"trainjobs {name!r} not found"))
        if method == "DELETE":
            self.deleted.append(name)
            return _send(h, 200, _status(200, "", "deleted", "Success"))
        return _send(h, 200, self._advance(job))

    def _advance(self, job: dict[str, Any]) -> dict[str, Any]:
        name = job["metadata"]["name"]
        self._step[name] = min(self._step[name] + 1, len(self.script) - 1)
        state = self.script[self._step[name]]
        if state == "Running" and self.on_running and not job.get("_ran"):
            job["_ran"] = True
            self.on_running(job)
        status: dict[str, Any] = {}
        if state != "Created":
            status["jobsStatus"] = [{"name": "node", "active": 1 if state == "Running" else 0}]
        if state in ("Complete", "Failed"):
            reason, message = self.failure if state == "Failed" else ("JobSetCompleted", "done")
            status["conditions"] = [{"type": state, "status": "True", "reason": reason, "message": message,
                                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]  # fmt: skip
        return {**{k: v for k, v in job.items() if k != "_ran"}, "status": status}

    def _running(self, ns: str) -> dict[str, Any] | None:
        for job in self.created:
            name = job["metadata"]["name"]
            if job["metadata"]["namespace"] == ns and self.script[max(self._step[name], 0)] != "Created":
                return job
        return None

    def _pods(self, h: Any, ns: str, pod: str | None, full_path: str) -> None:
        job = self._running(ns)
        if pod is not None:
            if job is None or pod != f"{job['metadata']['name']}-node-0-0" or "container=node" not in full_path:
                return _send(h, 404, _status(404, "NotFound", f"pod {pod} not found"))
            return _send(h, 200, self.log.encode(), "text/plain")
        items = []
        if job is not None and "replicatedjob-name%3Dnode" in full_path.replace("=", "%3D"):
            name = job["metadata"]["name"]
            labels = {"jobset.sigs.k8s.io/jobset-name": name, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                      "batch.kubernetes.io/job-completion-index": "0"}  # fmt: skip
            items.append({"metadata": {"name": f"{name}-node-0-0", "namespace": ns, "labels": labels},
                          "spec": {"containers": [{"name": "node", "image": job["spec"]["trainer"]["image"]}]},
                          "status": {"phase": "Running"}})  # fmt: skip
        _send(h, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})


def _status(code: int, reason: str, message: str, status: str = "Failure") -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "status": status, "code": code, "reason": reason,
            "message": message}  # fmt: skip


def _send(h: Any, code: int, payload: Any, content_type: str = "application/json") -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    h.send_response(code)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)
