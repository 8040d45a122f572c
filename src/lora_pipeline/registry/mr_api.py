"""Which Model Registry REST API a server speaks, and the official client pointed at it.

Kubeflow Model Registry servers serve one API version: `v1alpha3` (earlier Kubeflow releases, upstream's
pin `model-registry==0.3.4`) or `v1` (current; the only one the `model-registry` 0.3.18 client calls). The
calls lora-pipeline makes (find/create a registered model, a version, a version's artifacts) have the same
request and response shapes in both: only the path prefix differs. So both are reached through the
official client, its requests' prefix rewritten for a v1alpha3 server, rather than through a second REST
layer to keep in step with the first. A server that serves neither is refused in one line naming both.
"""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from typing import Any

from lora_pipeline.errors import RegistryError

APIS = ("v1", "v1alpha3")  # newest first: a server serving both is spoken to in the client's own version
CLIENT_API = "v1"  # what the installed client's generated paths say
PROBE = "/registered_models?pageSize=1"


def prefix(api: str) -> str:
    return f"/api/model_registry/{api}"


def detect(base: str, token: str = "", ca_cert: str = "", timeout: float = 10.0) -> str:
    """The API version the server at `base` (scheme://host:port) serves: a 200 on one prefix and a 404 on
    the other decides. A refused token is a RegistryError; no answer or a 5xx is a ConnectionError (the
    caller retries those)."""
    statuses: dict[str, int] = {}
    for api in APIS:
        status = _get(base + prefix(api) + PROBE, token, ca_cert, timeout)
        if status == 200:
            return api
        if status in (401, 403):
            raise RegistryError(
                f"the Model Registry at {base} refused the request (HTTP {status}): "
                "check --registry.token or MODEL_REGISTRY_TOKEN",
                field="registry.token",
            )
        if status >= 500 or status == 429:
            raise ConnectionError(f"HTTP {status} from {base}")
        statuses[api] = status
    seen = ", ".join(f"{prefix(api)} HTTP {status}" for api, status in statuses.items())
    raise RegistryError(
        f"{base} serves no Model Registry API that lora-pipeline speaks ({seen}): it speaks the Kubeflow Model "
        "Registry REST API v1 and v1alpha3",
        field="registry.address",
    )


def _get(url: str, token: str, ca_cert: str, timeout: float) -> int:
    headers = {"Accept": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    context = ssl.create_default_context(cafile=ca_cert or None) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=context):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            raise RegistryError(
                f"TLS with {url.split('/api/')[0]} failed ({exc.reason}); set --registry.ca_cert to the "
                "registry's CA bundle",
                field="registry.ca_cert",
            ) from None
        raise ConnectionError(str(exc.reason)) from None
    except (TimeoutError, OSError) as exc:
        raise ConnectionError(str(exc) or type(exc).__name__) from None


# The client's configured host ("scheme://host:port") -> the API version its server speaks. The client
# builds its own configuration inside its constructor (which already calls the server), so the version is
# looked up by host when each request's URL is built.
_HOST_API: dict[str, str] = {}


def speak(host: str, api: str) -> None:
    """Make the official client's requests to `host` use `api`'s path prefix (installed once, idempotent;
    requests to hosts not named here are left exactly as the client builds them)."""
    from mr_openapi.api_client import ApiClient

    _HOST_API[host] = api
    if getattr(ApiClient.param_serialize, "_lora_prefix", False):
        return
    original = ApiClient.param_serialize

    def param_serialize(self: Any, *args: Any, **kwargs: Any) -> Any:
        method, url, *rest = original(self, *args, **kwargs)
        host = self.configuration.host
        api = _HOST_API.get(host, CLIENT_API)
        if api != CLIENT_API and url.startswith(host + prefix(CLIENT_API) + "/"):
            url = host + prefix(api) + url[len(host + prefix(CLIENT_API)) :]
        return (method, url, *rest)

    param_serialize._lora_prefix = True  # type: ignore[attr-defined]
    ApiClient.param_serialize = param_serialize  # type: ignore[method-assign]
