"""https:// and http:// downloads with a timeout and retries on transient failures."""

from __future__ import annotations

import base64
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from lora_pipeline.errors import SourceError

log = logging.getLogger(__name__)

RETRIES = 3
TIMEOUT_S = 30.0


class HttpSource:
    def fetch(self, uri: str, dest: Path) -> Path:
        from lora_pipeline.sources import redact

        name = PurePosixPath(urlsplit(uri).path).name or "data.jsonl"
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / name
        last = ""
        for attempt in range(1, RETRIES + 1):
            try:
                with (
                    urllib.request.urlopen(_request(uri), timeout=TIMEOUT_S) as resp,
                    open(f"{target}.part", "wb") as out,
                ):
                    shutil.copyfileobj(resp, out)
                os.replace(f"{target}.part", target)
                return target
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code < 500:  # a client error will not change on retry
                    break
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                last = str(getattr(exc, "reason", exc))
            if attempt < RETRIES:
                log.warning("download failed (%s), retry %d/%d: %s", last, attempt, RETRIES - 1, redact(uri))
                time.sleep(0.5 * 2**attempt)
        raise SourceError(f"cannot download {redact(uri)}: {last}", field="dataset.data_uri")


def _request(uri: str) -> urllib.request.Request:
    """user:password@ in the URI becomes a Basic auth header (urllib would try to resolve it as a host)."""
    parts = urlsplit(uri)
    if parts.username is None:
        return urllib.request.Request(uri)
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    request = urllib.request.Request(parts._replace(netloc=host).geturl())
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    return request
