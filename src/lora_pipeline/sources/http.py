"""https:// and http:// downloads and fingerprints, with timeouts and retries on transient failures.

user:password@ in a URI becomes a Basic auth header, and the query string (a pre-signed URL's token) is
sent as it is; neither appears in any message or log line, which name the URI through redact().
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import IO, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

from lora_pipeline.errors import SourceError
from lora_pipeline.files import confined
from lora_pipeline.progress import Meter
from lora_pipeline.sources import FIELD, MARK, Limits, redact

log = logging.getLogger(__name__)

RETRIES = 3  # attempts in all, for 5xx answers and network errors; a 4xx answer is final
CHECK_TIMEOUT_S = 10.0  # the fingerprint is the pre-flight check of the source: a silent host fails it fast
CHECK_DEADLINE_S = 60.0  # ... and all its attempts, a body read to hash it included, end within this
# A transfer "stalls" when fewer than this many bytes arrive in a `timeout` window (curl's --speed-limit):
# a server that drips a byte every few seconds never trips a socket timeout, and would hold a run for days.
STALL_MIN_BYTES = 1024
BLOCK = 1 << 16  # read1() returns what has arrived, up to this: progress and the clocks are checked per block
# Answers to HEAD after which a GET is tried: HEAD not allowed (405, 501), or a URL pre-signed for GET
# only, which S3 and GCS answer with 403 to any other method.
HEAD_REFUSED = (403, 405, 501)

T = TypeVar("T")


class HttpSource:
    def fetch(self, uri: str, dest: Path, limits: Limits) -> Path:
        """Download to `dest`; a transfer cut off midway is resumed where it stopped (Range + If-Range),
        and one that grows past `limits.max_bytes` is stopped."""
        name = PurePosixPath(_split(uri).path).name or "data.jsonl"
        dest.mkdir(parents=True, exist_ok=True)
        target = confined(dest, name, what="file name in the URL", source=redact(uri))
        part = dest / f"{name}.part"
        part.unlink(missing_ok=True)
        validator: list[str] = []  # the first answer's ETag or Last-Modified: a resume must be of the same bytes

        clock = Clock(uri, limits.timeout, limits.deadline)

        def download() -> Path:
            have = part.stat().st_size if part.exists() else 0
            headers = {"Range": f"bytes={have}-", "If-Range": validator[0]} if have and validator else {}
            with _open(uri, "GET", clock.wait(), headers) as resp:
                resumed = resp.status == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")
                if not resumed:
                    have = 0  # a full answer (the server ignored the range, or the file changed): start over
                if not validator and (v := resp.headers.get("ETag") or resp.headers.get("Last-Modified")):
                    validator.append(v)
                length = resp.headers.get("Content-Length")
                expected = have + int(length) if length and length.isdigit() else None
                _check_cap(uri, expected or 0, limits.max_bytes)
                meter = Meter(log, f"download {redact(uri)}", "B", expected)
                meter.update(have)

                def check(n: int) -> None:
                    meter.update(have + n - meter.count)
                    _check_cap(uri, have + n, limits.max_bytes)

                with open(part, "ab" if resumed else "wb") as out:
                    size = have + _copy(resp, out, check, clock)
                meter.close()
            if expected is not None and size < expected:  # the server closed the connection early
                raise http.client.IncompleteRead(b"", expected - size)
            os.replace(part, target)
            return target

        return _retrying(uri, download, "download", clock)

    def fingerprint(self, uri: str) -> str:
        """The ETag, else Last-Modified + Content-Length, from a HEAD request; else the sha256 of the body."""
        clock = Clock(uri, CHECK_TIMEOUT_S, CHECK_DEADLINE_S, "the source check's limit")
        headers = _retrying(uri, lambda: _head(uri, clock), "source check", clock)
        identity = _identity(headers) if headers is not None else None
        return identity or _retrying(uri, lambda: _get_identity(uri, clock), "source check", clock)


class Clock:
    """The limits on waiting for one URI: `timeout` seconds to connect, for each read, and to receive
    STALL_MIN_BYTES; `deadline` seconds for everything, retries included (0 = no total limit)."""

    def __init__(self, uri: str, timeout: float, deadline: float = 0.0, name: str = "dataset.deadline") -> None:
        self.uri, self.timeout, self.name = uri, timeout, name
        self.started = time.monotonic()
        self.ends = self.started + deadline if deadline else None
        self.window, self.window_bytes = self.started, 0

    def wait(self) -> float:
        """The socket timeout for the next request: `timeout`, or less when the deadline is nearer."""
        left = self.remaining()
        return self.timeout if left is None else max(0.05, min(self.timeout, left))

    def remaining(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()

    def check(self) -> None:
        left = self.remaining()
        if left is not None and left <= 0:
            raise SourceError(
                f"gave up: {redact(self.uri)} (not done within {self.name}, {self.ends - self.started:g} s)",  # type: ignore[operator]
                field=FIELD,
            )

    def start_transfer(self) -> None:
        self.window, self.window_bytes = time.monotonic(), 0

    def received(self, total: int) -> None:
        """Called with the bytes received so far by this transfer, after each block."""
        self.check()
        now = time.monotonic()
        if now - self.window < self.timeout:
            return
        if total - self.window_bytes < STALL_MIN_BYTES:
            got = total - self.window_bytes
            raise TimeoutError(f"stalled: {got} bytes in {now - self.window:.0f} s, under 1 KiB per dataset.timeout")
        self.window, self.window_bytes = now, total


def _head(uri: str, clock: Clock) -> Message | None:
    """The response headers, or None when the server does not answer HEAD for this URL."""
    try:
        with _open(uri, "HEAD", clock.wait()) as resp:
            return resp.headers
    except urllib.error.HTTPError as exc:
        if exc.code not in HEAD_REFUSED:
            raise
        exc.close()
        return None


def _get_identity(uri: str, clock: Clock) -> str:
    """A GET's validators when it has them (the body is then left unread), else the sha256 of the body."""
    digest = hashlib.sha256()
    with _open(uri, "GET", clock.wait()) as resp:
        identity = _identity(resp.headers)
        if identity:
            return identity
        for block in _blocks(resp, clock):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _identity(headers: Message) -> str | None:
    if etag := headers.get("ETag"):
        return f"etag:{etag}"
    if modified := headers.get("Last-Modified"):
        return f"modified:{modified};length={headers.get('Content-Length', '?')}"
    return None


def _copy(src: http.client.HTTPResponse, out: IO[bytes], check: Callable[[int], None], clock: Clock) -> int:
    n = 0
    for block in _blocks(src, clock):
        out.write(block)
        n += len(block)
        check(n)
    return n


def _blocks(src: http.client.HTTPResponse, clock: Clock) -> Iterator[bytes]:
    """The body as it arrives (read1: never waits to fill a block), each block checked against the clock."""
    clock.start_transfer()
    n = 0
    for block in iter(lambda: src.read1(BLOCK), b""):
        n += len(block)
        clock.received(n)
        yield block


def _check_cap(uri: str, size: int, max_bytes: int) -> None:
    if max_bytes and size > max_bytes:
        raise SourceError(f"{redact(uri)} is larger than dataset.max_bytes ({max_bytes} bytes)", field=FIELD)


def _retrying(uri: str, attempt: Callable[[], T], what: str, clock: Clock) -> T:
    """attempt() until it succeeds, at most RETRIES times while failures may be transient and the clock's
    deadline has not passed; else SourceError."""
    for n in range(1, RETRIES + 1):
        clock.check()
        try:
            return attempt()
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code < 500:  # a client error will not change on retry
                raise _client_error(uri, exc.code) from None
            summary, detail = "server error", f"HTTP {exc.code}"
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, truncated bodies
            summary, detail = _network_failure(exc, uri)
            if _permanent(exc):
                raise SourceError(f"{summary}: {redact(uri)} ({detail})", field=FIELD) from None
        if n < RETRIES:
            log.warning("%s failed (%s), retry %d/%d: %s", what, detail, n, RETRIES - 1, redact(uri))
            left = clock.remaining()
            time.sleep(min(0.5 * 2**n, max(0.0, left)) if left is not None else 0.5 * 2**n)
    raise SourceError(f"{summary}: {redact(uri)} ({detail}; {RETRIES} attempts)", field=FIELD)


def _client_error(uri: str, code: int) -> SourceError:
    if code in (404, 410):
        summary = "not found"
    elif code in (401, 403, 407):
        summary = "access denied"
    else:
        summary = "request refused"
    return SourceError(f"{summary}: {redact(uri)} (HTTP {code})", field=FIELD)


def _permanent(exc: BaseException) -> bool:
    """Failures that no retry will clear: a host name that does not exist, a TLS handshake that cannot succeed
    (certificate not trusted or not for this host, a server that does not speak TLS)."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, socket.gaierror):
        return reason.errno != socket.EAI_AGAIN  # "temporary failure in name resolution" may clear
    return isinstance(reason, ssl.SSLError) and not isinstance(reason, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


def _network_failure(exc: BaseException, uri: str) -> tuple[str, str]:
    """(summary, detail) of a failure below HTTP. urllib wraps errors while connecting and sending in
    URLError; errors while waiting for or reading the answer come bare."""
    connecting = isinstance(exc, urllib.error.URLError)
    reason = exc.reason if connecting else exc
    if isinstance(reason, ConnectionRefusedError):
        return "cannot connect", "connection refused"
    if isinstance(reason, TimeoutError):
        text = str(reason)
        return ("stalled", text.removeprefix("stalled: ")) if text.startswith("stalled") else ("no answer", "timed out")
    if isinstance(reason, socket.gaierror):
        return "cannot resolve host", _without_secrets(reason.strerror or str(reason), uri)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return "TLS certificate refused", _without_secrets(reason.verify_message or str(reason), uri)
    if isinstance(reason, ssl.SSLError) and connecting:
        return "TLS handshake failed", _without_secrets(reason.reason or str(reason), uri)
    detail = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return ("cannot connect" if connecting else "transfer failed"), _without_secrets(detail, uri)


def _without_secrets(text: str, uri: str) -> str:
    """Library messages may quote the URL they were given: take out its password and query string."""
    parts = urlsplit(uri)
    for secret in (parts.password, parts.query):
        if secret:
            text = text.replace(secret, MARK).replace(unquote(secret), MARK)
    return text


def _split(uri: str) -> SplitResult:
    try:
        parts = urlsplit(uri)
        _ = parts.port  # parsed on access: a bad port fails here, with a clean message, not deep inside urllib
    except ValueError:
        raise SourceError(f"not a valid URL: {redact(uri)}", field=FIELD) from None
    if not parts.hostname:
        raise SourceError(f"no host in URL: {redact(uri)}", field=FIELD)
    from lora_pipeline.redaction import split_uri

    userinfo = (split_uri(uri) or (None, None))[1]
    if userinfo is not None and userinfo != parts.netloc.rpartition("@")[0]:
        # `https://u:p@ss/w@host/x`: urllib would send part of the password to the host `ss`
        raise SourceError(
            f"ambiguous credentials in URL (percent-encode '@', '/', '?' and '#' in them): {redact(uri)}",
            field=FIELD,
        )
    return parts


def _open(uri: str, method: str, timeout: float, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    try:
        request = _request(uri, method)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        return _OPENER.open(request, timeout=timeout)
    except ValueError:  # http.client.InvalidURL and friends: their message repeats the URL in full
        raise SourceError(f"not a valid URL: {redact(uri)}", field=FIELD) from None


def _request(uri: str, method: str) -> urllib.request.Request:
    """user:password@ in the URI becomes a Basic auth header (urllib would try to resolve it as a host)."""
    parts = _split(uri)
    if parts.username is None:
        return urllib.request.Request(uri, method=method)
    host = parts.netloc.rsplit("@", 1)[1]
    request = urllib.request.Request(parts._replace(netloc=host).geturl(), method=method)
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    # Unredirected: urllib copies ordinary headers onto a redirect to any host; _Redirects decides instead.
    request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, except that a HEAD stays a HEAD (urllib turns it into a GET, which starts the
    whole download) and that Basic auth follows a redirect only to the same scheme, host and port: the
    password is never sent to another server."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Message, newurl: str
    ) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is None:
            return None
        if req.get_method() == "HEAD":
            new.method = "HEAD"
        auth = req.unredirected_hdrs.get("Authorization")
        if auth and _origin(new.full_url) == _origin(req.full_url):
            new.add_unredirected_header("Authorization", auth)
        return new


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


_OPENER = urllib.request.build_opener(_Redirects())
