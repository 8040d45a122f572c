"""https:// and http:// downloads with a timeout and retries on transient failures."""

from __future__ import annotations

import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

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
                    urllib.request.urlopen(uri, timeout=TIMEOUT_S) as resp,
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
