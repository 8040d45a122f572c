"""oci://registry/repository:tag (or @sha256:...) base models: a KServe modelcar image or an ORAS artifact,
pulled over the OCI distribution API and cached by manifest digest.

- Address: plain http for a loopback registry (localhost, 127.0.0.0/8, ::1), https for any other, unless
  LORA_PIPELINE_OCI_PLAIN_HTTP=1 (a registry inside a cluster without TLS).
- Credentials: OCI_PULL_SECRET_MODEL_DOWNLOAD (the content of a docker config.json, as the Kubeflow
  training component takes it), else $DOCKER_CONFIG/config.json, else ~/.docker/config.json; `auths` keyed
  by registry host[:port]. Never in the URI, never printed, never stored in the cache.
- Auth: Basic, or a Bearer token from the WWW-Authenticate realm (Docker Hub, Quay, GHCR, Harbor).
- Limits: TIMEOUT_S to connect and per read, CHECK_DEADLINE_S for the pre-flight check, PULL_DEADLINE_S
  (or $LORA_PIPELINE_OCI_DEADLINE) for a whole pull, retries included.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from lora_pipeline.errors import SourceError
from lora_pipeline.files import cache_work_dir, place_complete
from lora_pipeline.sources import redact
from lora_pipeline.sources.oci_layers import apply_layer, model_dir

log = logging.getLogger(__name__)

FIELD = "train.model"
SECRET_ENV = "OCI_PULL_SECRET_MODEL_DOWNLOAD"
PLAIN_HTTP_ENV = "LORA_PIPELINE_OCI_PLAIN_HTTP"
TIMEOUT_S = 30.0
CHECK_DEADLINE_S = 60.0
DEADLINE_ENV = "LORA_PIPELINE_OCI_DEADLINE"
PULL_DEADLINE_S = 4 * 3600.0
RETRIES = 3
BLOCK = 1 << 20
PLATFORM = ("linux", "amd64")
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
_REF = re.compile(r"^(?P<host>[^/@]+)/(?P<repo>[a-z0-9]+(?:[._/-]+[a-z0-9]+)*)(?::(?P<tag>[\w][\w.-]{0,127}))?"
                  r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")  # fmt: skip
_LOOPBACK = re.compile(r"^(localhost|127(\.\d{1,3}){3}|\[?::1\]?)$")


@dataclass
class Reference:
    uri: str
    host: str  # host[:port] as written
    repo: str
    ref: str  # a tag or a digest
    scheme: str

    def url(self, kind: str, ref: str) -> str:
        host = "registry-1.docker.io" if self.host == "docker.io" else self.host  # Docker Hub's API host
        return f"{self.scheme}://{host}/v2/{self.repo}/{kind}/{ref}"


def parse(uri: str) -> Reference:
    from lora_pipeline.redaction import split_uri

    parts = split_uri(uri)
    if parts is None or parts[0].lower() != "oci":
        raise SourceError(f"not an oci:// reference: {redact(uri)}", field=FIELD)
    if parts[1] is not None or parts[3] is not None:
        raise SourceError(
            f"credentials and query strings do not belong in oci:// references (use {SECRET_ENV} or "
            f"~/.docker/config.json): {redact(uri)}",
            field=FIELD,
        )
    match = _REF.match(parts[2])
    if not match or parts[4] is not None:
        raise SourceError(
            f"not an OCI reference (oci://registry[:port]/repository[:tag][@sha256:...]): {redact(uri)}", field=FIELD
        )
    host, repo = match["host"], match["repo"]
    if host == "docker.io" and "/" not in repo:
        repo = f"library/{repo}"  # Docker Hub's official images
    plain = os.environ.get(PLAIN_HTTP_ENV, "").lower() in ("1", "true", "yes")
    scheme = "http" if plain or _LOOPBACK.match(host.rsplit(":", 1)[0] if "]" not in host else host) else "https"
    return Reference(uri, host, repo, match["digest"] or match["tag"] or "latest", scheme)


def credentials(host: str) -> tuple[str, str] | None:
    """(user, password) for `host` from OCI_PULL_SECRET_MODEL_DOWNLOAD or the docker config; None = anonymous.
    Errors name where the config came from, never its content."""
    text, origin = os.environ.get(SECRET_ENV), SECRET_ENV
    if not text:
        folder = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
        path = Path(folder) / "config.json"
        if not path.is_file():
            return None
        text, origin = path.read_text(errors="replace"), str(path)
    try:
        auths = json.loads(text).get("auths") or {}
        assert isinstance(auths, dict)
    except (ValueError, AttributeError, AssertionError):
        raise SourceError(f'{origin} is not a docker config.json (a JSON object with "auths")', field=FIELD) from None
    for key, entry in auths.items():
        if _registry_host(key) not in _HOST_KEYS.get(host.lower(), (host.lower(),)) or not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except ValueError:
                why = f'{origin}: the "auth" of {host} is not base64 of user:password'
                raise SourceError(why, field=FIELD) from None
        if user:
            from lora_pipeline.redaction import remember

            remember(password or "")
            return str(user), str(password or "")
    return None


_HOST_KEYS = {"docker.io": ("docker.io", "index.docker.io", "registry-1.docker.io")}  # `docker login`'s keys


def _registry_host(key: str) -> str:
    """`https://host:port/v1/` and `host:port` both name the registry `host:port`."""
    return key.lower().split("://", 1)[-1].split("/", 1)[0]


class ServerError(OSError):
    """A 5xx answer, retried like a network failure."""


@dataclass
class Session:
    """Requests to one registry: auth negotiated once (Basic or a Bearer token), a deadline on everything."""

    ref: Reference
    deadline: float
    started: float = field(default_factory=time.monotonic)
    auth: str | None = None

    def __post_init__(self) -> None:
        self.creds = credentials(self.ref.host)

    def remaining(self) -> float:
        left = self.started + self.deadline - time.monotonic()
        if left <= 0:
            raise SourceError(f"gave up: {redact(self.ref.uri)} (not done within {self.deadline:g} s)", field=FIELD)
        return left

    def open(self, url: str, accept: str = "", headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """GET `url` with auth, retrying a 401 once after negotiating it; HTTP errors become SourceError."""
        for attempt in (1, 2):
            request = urllib.request.Request(url, headers={**({"Accept": accept} if accept else {}), **(headers or {})})
            if self.auth:
                request.add_unredirected_header("Authorization", self.auth)  # never sent on to a blob store's host
            try:
                return urllib.request.urlopen(request, timeout=min(TIMEOUT_S, self.remaining()))
            except urllib.error.HTTPError as exc:
                challenge = exc.headers.get("WWW-Authenticate", "")
                exc.close()
                if exc.code == 401 and attempt == 1 and self._negotiate(challenge):
                    continue
                if exc.code >= 500:  # the registry's passing trouble: _network retries it
                    raise ServerError(f"HTTP {exc.code}") from None
                raise self._error(exc.code) from None
        raise AssertionError("unreachable")

    def _negotiate(self, challenge: str) -> bool:
        """Set self.auth from a 401's challenge; False when there is nothing new to try."""
        scheme, _, params = challenge.partition(" ")
        basic = None
        if self.creds:
            basic = "Basic " + base64.b64encode(":".join(self.creds).encode()).decode()
        if scheme.lower() == "basic":
            if basic is None or self.auth == basic:
                return False
            self.auth = basic
            return True
        if scheme.lower() != "bearer":
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        if "realm" not in fields:
            return False
        query = urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
        request = urllib.request.Request(fields["realm"] + ("?" + query if query else ""))
        if basic:
            request.add_unredirected_header("Authorization", basic)
        try:
            with urllib.request.urlopen(request, timeout=min(TIMEOUT_S, self.remaining())) as resp:
                answer = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as exc:
            exc.close()
            raise self._error(exc.code, "token service") from None
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not token:
            raise SourceError(f"access denied: {redact(self.ref.uri)} (no token from the registry)", field=FIELD)
        from lora_pipeline.redaction import remember

        remember(token)
        self.auth = f"Bearer {token}"
        return True

    def _error(self, code: int, what: str = "registry") -> SourceError:
        uri = redact(self.ref.uri)
        if code in (401, 403):
            where = f"{SECRET_ENV} or the docker config" if self.creds else f"no credentials for {self.ref.host}"
            return SourceError(f"access denied: {uri} (HTTP {code} from the {what}; {where})", field=FIELD)
        if code == 404:
            return SourceError(f"not found: {uri} (no such repository, tag or digest)", field=FIELD)
        return SourceError(f"{what} error: {uri} (HTTP {code})", field=FIELD)


def _network(session: Session, call):  # noqa: ANN001, ANN202 - a thunk and its result
    """call(), retried on network failures (RETRIES attempts within the session's deadline); SourceError."""
    uri = redact(session.ref.uri)
    for n in range(1, RETRIES + 1):
        session.remaining()
        try:
            return call()
        except (OSError, http.client.HTTPException) as exc:
            connecting = isinstance(exc, urllib.error.URLError)  # urllib wraps errors up to the request's sending
            reason = exc.reason if connecting else exc
            if isinstance(reason, socket.gaierror):
                raise SourceError(f"cannot resolve host: {uri}", field=FIELD) from None
            if isinstance(reason, ConnectionRefusedError):
                detail = "connection refused"
            elif isinstance(reason, TimeoutError):
                detail = "timed out"
            else:
                detail = type(reason).__name__ if not str(reason) else str(reason)[:200]
            if n == RETRIES:
                summary = "registry error" if isinstance(reason, ServerError) else "transfer failed"
                why = f"{'cannot connect' if connecting else summary}: {uri} ({detail}; {RETRIES} attempts)"
                raise SourceError(why, field=FIELD) from None
            log.warning("oci: %s (%s), retry %d/%d", uri, detail, n, RETRIES - 1)
            time.sleep(min(0.5 * 2**n, max(0.0, session.remaining())))
    raise AssertionError("unreachable")


def resolve(session: Session) -> tuple[str, dict]:
    """(digest, manifest) of the image the reference names; from an index, linux/amd64 or its only platform."""
    ref = session.ref
    digest, doc = _manifest(session, ref.ref)
    if "manifests" in doc:  # an index (multi-platform)
        entries = [m for m in doc["manifests"] if isinstance(m, dict)]
        chosen = [m for m in entries if _platform(m) == PLATFORM]
        chosen = chosen or (entries if len(entries) == 1 else [])
        if not chosen:
            raise SourceError(f"{redact(ref.uri)}: the index has no linux/amd64 image", field=FIELD)
        digest, doc = _manifest(session, chosen[0]["digest"])
    if not isinstance(doc.get("layers"), list):
        raise SourceError(f"{redact(ref.uri)}: not an image manifest (no layers)", field=FIELD)
    return digest, doc


def _platform(entry: dict) -> tuple[str, str]:
    platform = entry.get("platform") or {}
    return platform.get("os"), platform.get("architecture")


def _manifest(session: Session, ref: str) -> tuple[str, dict]:
    def get() -> bytes:
        with session.open(session.ref.url("manifests", ref), ACCEPT) as resp:
            return resp.read(8 << 20)

    body = _network(session, get)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.startswith("sha256:") and digest != ref:
        raise SourceError(f"digest mismatch: manifest {ref} of {redact(session.ref.uri)} (got {digest})", field=FIELD)
    try:
        doc = json.loads(body)
        assert isinstance(doc, dict)
    except (ValueError, AssertionError):
        raise SourceError(f"{redact(session.ref.uri)}: the manifest is not JSON", field=FIELD) from None
    return digest, doc


def model_fingerprint(uri: str) -> str:
    """The digest of the image `uri` names (its manifest's, after choosing a platform): the pre-flight check."""
    digest, _ = resolve(Session(parse(uri), CHECK_DEADLINE_S))
    return f"oci:{digest}"


def fetch_model(uri: str, cache_dir: Path) -> Path:
    """The image's model directory, pulled once into `cache_dir`/oci-<manifest digest>.

    Made in a temporary directory (blobs verified against their digests as they stream) and renamed into place
    with a `.complete` mark: an interrupted pull leaves nothing that is used, and its leftovers are removed by
    the next pull, which starts over."""
    session = Session(parse(uri), _pull_deadline())
    digest, manifest = resolve(session)
    target = Path(cache_dir) / f"oci-{digest.split(':', 1)[1][:32]}"
    if (target / ".complete").is_file():
        return target
    with cache_work_dir(target) as tmp:
        root, blobs = tmp / "rootfs", tmp / "blobs"
        root.mkdir()
        blobs.mkdir()
        for layer in manifest["layers"]:
            blob = _download_blob(session, layer, blobs)
            apply_layer(blob, layer, root, redact(uri))
            blob.unlink()
        place_complete(model_dir(root, redact(uri)), target, f"{redact(uri)}\n{digest}")
    return target


def _pull_deadline() -> float:
    text = os.environ.get(DEADLINE_ENV, "").strip()
    try:
        seconds = float(text) if text else PULL_DEADLINE_S
        assert seconds > 0
    except (ValueError, AssertionError):
        raise SourceError(
            f"{DEADLINE_ENV} must be a number of seconds above 0, not {text[:40]!r}", field=FIELD
        ) from None
    return seconds


def _download_blob(session: Session, layer: dict, folder: Path) -> Path:
    digest = str(layer.get("digest", ""))
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise SourceError(f"{redact(session.ref.uri)}: layer digest {digest[:80]!r} is not sha256", field=FIELD)
    path = folder / digest.split(":", 1)[1]

    def download() -> str:
        hasher = hashlib.sha256()
        with session.open(session.ref.url("blobs", digest)) as resp, open(path, "wb") as out:
            for block in iter(lambda: resp.read1(BLOCK), b""):
                session.remaining()
                hasher.update(block)
                out.write(block)
            if resp.length:  # the connection closed before Content-Length (read1 returns b"" then)
                raise http.client.IncompleteRead(b"", resp.length)
        return "sha256:" + hasher.hexdigest()

    got = _network(session, download)
    if got != digest:
        raise SourceError(f"digest mismatch: layer {digest} of {redact(session.ref.uri)} (got {got})", field=FIELD)
    return path
