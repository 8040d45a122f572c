"""The Kubeflow Model Registry, through its official Python client (`model-registry`), for servers of REST
API v1 or v1alpha3 (detected on first contact: mr_api.py says how and why one client serves both).

The client is imported and built only here, when registering. A registry that does not answer (connection
refused, timeouts, 5xx) is retried with backoff, then reported in one line; a refused token is not retried.
The whole registration, retries included, ends within `registry.timeout` seconds: the client's own limit is
5 minutes a request, with retries of its own, so each attempt runs under deadline.within().
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any
from urllib.parse import urlsplit

from lora_pipeline.deadline import Overdue, within
from lora_pipeline.errors import RegistryError
from lora_pipeline.registry import Entry, Outcome
from lora_pipeline.registry.artifacts import AUTO, DIGEST_KEY, merged_name

log = logging.getLogger(__name__)

# Seconds to wait before each retry: a registry pod restarting is back within ~30 s.
RETRY_DELAYS: tuple[float, ...] = (1, 2, 4, 8, 16)
DEFAULT_TIMEOUT_S = 60.0  # the whole registration, retries included (registry.timeout)
_TRANSIENT_STATUS = (429, 500, 502, 503, 504)
INSTALL_HINT = (
    "a remote registry needs the Kubeflow Model Registry client: pip install 'lora-pipeline[kubeflow]' "
    "(or model-registry); --registry.address local registers in a local file instead"
)


def normalise_address(address: str, port: int) -> tuple[str, int]:
    """The client's (server_address, port); a port in the address wins over `port`. An `http://` or
    `https://` prefix decides the scheme by itself. A bare in-cluster host (`*.svc`, `*.svc.cluster.local`,
    or no dot at all: a Service name) means http, as the registry's REST port 8080 is plain HTTP inside a
    cluster; any other bare host means https."""
    url = address.strip().rstrip("/")
    if "://" not in url:
        host = (urlsplit(f"//{url}").hostname or "").rstrip(".")
        in_cluster = host.endswith((".svc", ".svc.cluster.local")) or (host and "." not in host)
        url = f"{'http' if in_cluster else 'https'}://{url}"
    return url, urlsplit(url).port or port


class KubeflowRegistry:
    def __init__(
        self,
        address: str,
        port: int,
        *,
        author: str,
        token: str = "",
        ca_cert: str = "",
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.server, self.port = normalise_address(address, port)
        parts = urlsplit(self.server)
        self.where = f"{parts.scheme}://{parts.hostname}:{self.port}"
        self.author, self._token, self.ca_cert, self.timeout = author, token, ca_cert, timeout
        # the client's own host string (its Configuration.host): the key its requests are rewritten by
        self.host = self.server if urlsplit(self.server).port else f"{self.server}:{self.port}"
        self.api = ""  # the server's API version, detected on first contact (mr_api.detect)

    def register(self, entry: Entry) -> Outcome:
        if entry.version == AUTO:
            raise RegistryError(
                "auto applies to the local registry: give a version for a Model Registry", field="registry.version"
            )
        delays, attempts = list(RETRY_DELAYS), 0
        ends = time.monotonic() + self.timeout
        while True:
            attempts += 1
            try:
                return within(ends - time.monotonic(), lambda: self._register_once(entry))
            except Overdue:
                raise self._gave_up(f"no answer within registry.timeout, {self.timeout:g} s", attempts) from None
            except Exception as exc:
                reason = self._transient(exc)
                if reason is None:
                    raise self._error(exc) from None
                if not delays or time.monotonic() + delays[0] >= ends:
                    raise self._gave_up(reason, attempts) from None
                delay = delays.pop(0)
                log.warning("register: %s at %s; retrying in %gs", reason, self.where, delay)
                time.sleep(delay)

    def _gave_up(self, reason: str, attempts: int) -> RegistryError:
        return RegistryError(
            f"the Model Registry at {self.where} did not answer after {attempts} attempt{'s' * (attempts != 1)} "
            f"({reason}); the train and eval outputs are kept: run `lora-pipeline register -o RUN_DIR` "
            "to register later",
            field="registry.address",
        )

    def _client(self) -> Any:
        try:
            from model_registry import ModelRegistry
        except ImportError:
            raise RegistryError(INSTALL_HINT, field="registry.address") from None
        from lora_pipeline.registry import mr_api

        if not self.api:
            self.api = mr_api.detect(self.host, self._token, self.ca_cert, timeout=self.timeout)
            log.info("register: %s serves Model Registry API %s", self.where, self.api)
        mr_api.speak(self.host, self.api)

        with warnings.catch_warnings():
            # Without a token the client warns, then tries the pod's service-account token; plain http is fine.
            warnings.simplefilter("ignore")
            return ModelRegistry(
                self.server,
                self.port,
                author=self.author,
                user_token=self._token or None,
                custom_ca=self.ca_cert or None,
                log_level=logging.ERROR,  # its port hints fire for any http port not ending in 80
            )

    def _register_once(self, entry: Entry) -> Outcome:
        client = self._client()  # connects: the constructor lists one registered model
        existing = client.get_registered_model(entry.name)
        version = client.get_model_version(entry.name, entry.version) if existing else None
        if version is None:
            client.register_model(
                entry.name,
                entry.uri,
                model_format_name=entry.format_name,
                model_format_version=entry.format_version,
                version=entry.version,
                author=entry.author,
                owner=entry.author,
                version_description=entry.description or None,
                metadata=entry.metadata,
            )
            status = "registered"
        else:
            status = "exists"
        model = client.get_registered_model(entry.name)
        version = client.get_model_version(entry.name, entry.version)
        artifact = client.get_model_artifact(entry.name, entry.version)
        if artifact is None:
            # A version left without its artifact (the registry went away between the two calls): finish it.
            artifact = client.async_runner(
                client._register_model_artifact(
                    version,
                    entry.name,
                    entry.uri,
                    model_format_name=entry.format_name,
                    model_format_version=entry.format_version,
                )
            )
            status = "registered"
        recorded = (version.custom_properties or {}).get(DIGEST_KEY)
        if (recorded or status == "exists") and recorded != entry.digest:
            # "no change" is decided by content: the same URI may hold a retrained adapter by now
            held = f"sha256 {str(recorded)[:12]}…" if recorded else "no recorded digest"
            raise RegistryError(
                f"{entry.name} {entry.version} already exists at {self.where} with other content ({held}, "
                f"{artifact.uri}; this adapter sha256 {entry.digest[:12]}…); nothing was overwritten: "
                "set a new --registry.version",
                field="registry.version",
            )
        if entry.merged_uri:
            self._add_merged(client, entry, version)
        return Outcome(status, str(model.id), str(version.id), str(artifact.id), self.where)

    def _add_merged(self, client: Any, entry: Entry, version: Any) -> None:
        """The merged model: a second artifact of the version, with its own digest; added, never replaced."""
        from model_registry.types import ModelArtifact

        name = merged_name(entry.name)
        found = client.async_runner(client._api.get_model_artifact_by_params(name, version.id))
        if found is None:
            artifact = ModelArtifact(
                name=name,
                uri=entry.merged_uri,
                model_format_name=entry.format_name,
                model_format_version=entry.format_version,
                custom_properties={DIGEST_KEY: entry.merged_digest},
            )
            client.async_runner(client._api.upsert_model_version_artifact(artifact, version.id))
            return
        recorded = (found.custom_properties or {}).get(DIGEST_KEY)
        if recorded != entry.merged_digest:
            raise RegistryError(
                f"{entry.name} {entry.version} already holds a merged model with other content ({found.uri}); "
                "nothing was replaced: set a new --registry.version",
                field="registry.version",
            )

    @staticmethod
    def _transient(exc: Exception) -> str | None:
        """A reason to retry, or None when retrying cannot help."""
        import asyncio

        import aiohttp
        from mr_openapi.exceptions import ApiException

        if isinstance(exc, ApiException) and exc.status in _TRANSIENT_STATUS:
            return f"HTTP {exc.status} {exc.reason or ''}".strip()
        if isinstance(exc, aiohttp.ClientSSLError):
            return None  # a certificate problem does not go away by waiting
        if isinstance(exc, (aiohttp.ClientConnectionError, asyncio.TimeoutError, ConnectionError)):
            return (str(exc).strip() or type(exc).__name__)[:160]
        return None

    def _error(self, exc: Exception) -> RegistryError:
        import aiohttp
        from model_registry.exceptions import StoreError
        from mr_openapi.exceptions import ApiException

        if isinstance(exc, RegistryError):
            return exc
        if isinstance(exc, ApiException) and exc.status in (401, 403):
            return RegistryError(
                f"the Model Registry at {self.where} refused the request (HTTP {exc.status}): "
                "check --registry.token or MODEL_REGISTRY_TOKEN",
                field="registry.token",
            )
        if isinstance(exc, ApiException):
            body = (exc.body or exc.reason or "").strip().replace("\n", " ")[:200]
            return RegistryError(
                f"the Model Registry at {self.where} answered HTTP {exc.status}: {body}", field="registry"
            )
        if isinstance(exc, aiohttp.ClientSSLError):
            return RegistryError(
                f"TLS with {self.where} failed ({exc}); set --registry.ca_cert to the registry's CA bundle",
                field="registry.ca_cert",
            )
        if isinstance(exc, StoreError):
            return RegistryError(f"{self.where}: {exc}", field="registry")
        return RegistryError(f"{self.where}: {type(exc).__name__}: {exc}", field="registry")
