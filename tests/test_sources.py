"""Sources: content fingerprints (local files, directories, http with and without validators), one-line
errors for missing or unreachable sources, redaction of credentials and query strings."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import base_url, loopback_server
from lora_pipeline import sources
from lora_pipeline.errors import DataError, SourceError
from lora_pipeline.sources import fingerprint, is_redacted, redact

SECRETS = ("secretpw", "SECRETTOKEN")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)


def free_port() -> int:
    """A loopback port that nothing listens on (just released), so connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_secrets(url: str) -> str:
    return url.replace("http://", "http://user:secretpw@") + "?sig=SECRETTOKEN"


def _assert_one_clean_line(err: pytest.ExceptionInfo[SourceError], *logs: str) -> None:
    message = str(err.value)
    assert err.value.field == "dataset.data_uri" and message.startswith("dataset.data_uri: ")
    assert "\n" not in message and "<redacted>" in message
    for text in (message, *logs):
        assert not any(secret in text for secret in SECRETS), text


# --- local --------------------------------------------------------------------------------------------


def test_local_file_is_identified_by_content_not_mtime(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n')
    first = fingerprint(str(path))
    assert first == "sha256:" + hashlib.sha256(b'{"a": 1}\n').hexdigest()

    os.utime(path, (1, 1))  # touch (to another time)
    assert fingerprint(str(path)) == first == fingerprint(f"file://{path}")

    stat = path.stat()
    path.write_text('{"a": 2}\n')  # same size, and the old mtime put back: only the content tells
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(str(path)) != first


def test_local_directory_follows_its_data_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "sub" / "b.json").write_text("[]")
    first = fingerprint(str(tmp_path))
    assert first.startswith("sha256-tree:")

    (tmp_path / "README.md").write_text("not read by the dataset stage")
    os.utime(tmp_path / "a.jsonl", (1, 1))
    assert fingerprint(str(tmp_path)) == first

    (tmp_path / "sub" / "b.json").write_text("{}")  # edited in place, same size
    edited = fingerprint(str(tmp_path))
    assert edited != first

    (tmp_path / "sub" / "b.json").rename(tmp_path / "sub" / "c.json")  # same bytes, another file name
    assert fingerprint(str(tmp_path)) not in (first, edited)


def test_missing_local_source_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        fingerprint(str(tmp_path / "nope.jsonl"))
    assert err.value.field == "dataset.data_uri" and "file not found" in str(err.value)
    assert "\n" not in str(err.value)


def test_unsupported_local_file_type_fails_the_check(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.txt'") as err:
        fingerprint(str(tmp_path / "d.txt"))
    assert err.value.field == "dataset.data_uri"


@pytest.mark.parametrize("uri", ["ftp://host/x.jsonl", "gs://key:secretpw@bucket/x.jsonl?sig=SECRETTOKEN"])
def test_unsupported_scheme(uri: str) -> None:
    with pytest.raises(SourceError, match="sources are not supported") as err:
        fingerprint(uri)
    assert err.value.field == "dataset.data_uri"
    assert not any(secret in str(err.value) for secret in SECRETS)


# --- http ---------------------------------------------------------------------------------------------


@dataclass
class Site:
    """What the test server answers; tests change it between requests."""

    url: str = ""
    body: bytes = b'{"messages": []}\n'
    validators: str = "etag"  # "etag", "modified" or "none"
    last_modified: str = "Mon, 01 Jan 2024 00:00:00 GMT"
    status: int = 200  # for every request
    head_status: int = 200  # for HEAD requests, when status is 200
    redirect_to: str = ""  # where /redirect points
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Authorization)


def _handler(site: Site) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802
            self._answer()

        def do_GET(self) -> None:  # noqa: N802
            self._answer()

        def _answer(self) -> None:
            site.requests.append((self.command, self.path, self.headers.get("Authorization")))
            if self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", site.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = site.status if site.status != 200 or self.command == "GET" else site.head_status
            if status != 200:
                self.send_error(status)
                return
            self.send_response(200)
            if site.validators == "etag":
                self.send_header("ETag", f'"{hashlib.sha256(site.body).hexdigest()[:16]}"')
            elif site.validators == "modified":
                self.send_header("Last-Modified", site.last_modified)
            self.send_header("Content-Length", str(len(site.body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(site.body)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def serve() -> Iterator[Callable[[], Site]]:
    """serve() -> a Site answering on a fresh loopback port (several per test for cross-host redirects)."""
    with contextlib.ExitStack() as servers:

        def start() -> Site:
            site = Site()
            site.url = base_url(servers.enter_context(loopback_server(_handler(site))))
            return site

        yield start


@pytest.fixture
def site(serve) -> Site:  # noqa: ANN001 - the factory above
    return serve()


@pytest.mark.integration
def test_etag_from_head_only(site: Site) -> None:
    uri = f"{site.url}/x.jsonl"
    first = fingerprint(uri)
    assert first.startswith('etag:"') and fingerprint(uri) == first
    site.body = b'{"messages": [1]}\n'
    assert fingerprint(uri) != first
    assert {method for method, _, _ in site.requests} == {"HEAD"}  # the check downloads nothing


@pytest.mark.integration
def test_last_modified_and_length_without_etag(site: Site) -> None:
    site.validators = "modified"
    uri = f"{site.url}/x.jsonl"
    first = fingerprint(uri)
    assert first == f"modified:{site.last_modified};length={len(site.body)}" and fingerprint(uri) == first
    site.last_modified = "Tue, 02 Jan 2024 00:00:00 GMT"
    assert fingerprint(uri) != first
    assert {method for method, _, _ in site.requests} == {"HEAD"}


@pytest.mark.integration
def test_no_validators_hashes_the_body(site: Site) -> None:
    site.validators = "none"
    uri = f"{site.url}/x.jsonl"
    first = fingerprint(uri)
    assert first == "sha256:" + hashlib.sha256(site.body).hexdigest() and fingerprint(uri) == first
    site.body = site.body.replace(b"[]", b"{}")  # same length: only the bytes tell
    assert fingerprint(uri) != first
    assert [method for method, _, _ in site.requests[:2]] == ["HEAD", "GET"]


@pytest.mark.integration
@pytest.mark.parametrize("head_status", [405, 501, 403])  # 403: a URL pre-signed for GET only
@pytest.mark.parametrize("validators", ["etag", "none"])
def test_head_refused_falls_back_to_get(site: Site, head_status: int, validators: str) -> None:
    site.head_status, site.validators = head_status, validators
    result = fingerprint(f"{site.url}/x.jsonl")
    expected = "etag:" if validators == "etag" else "sha256:" + hashlib.sha256(site.body).hexdigest()
    assert result.startswith(expected)
    assert [method for method, _, _ in site.requests] == ["HEAD", "GET"]


@pytest.mark.parametrize(
    ("status", "summary"), [(404, "not found"), (410, "not found"), (401, "access denied"), (403, "access denied")]
)
@pytest.mark.integration
def test_client_errors_are_final_and_one_line(
    site: Site, status: int, summary: str, caplog: pytest.LogCaptureFixture
) -> None:
    site.status = status
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError, match=f"{summary}: .*\\(HTTP {status}\\)") as err:
        fingerprint(_with_secrets(f"{site.url}/x.jsonl"))
    _assert_one_clean_line(err, caplog.text)
    assert len(site.requests) <= 2  # no retries (403 on HEAD is tried once more as a GET)


@pytest.mark.integration
def test_server_errors_are_retried_then_fail(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    site.status = 503
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError, match=r"server error: .*\(HTTP 503; 3 attempts\)") as err:
        fingerprint(_with_secrets(f"{site.url}/x.jsonl"))
    assert len(site.requests) == 3 and caplog.text.count("retry") == 2
    _assert_one_clean_line(err, caplog.text)


def test_connection_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(SourceError, match=r"cannot connect: .*\(connection refused; 3 attempts\)") as err:
        fingerprint(_with_secrets(f"http://127.0.0.1:{free_port()}/x.jsonl"))
    _assert_one_clean_line(err, caplog.text)


def test_silent_server_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lora_pipeline.sources.http.CHECK_TIMEOUT_S", 0.2)
    with socket.socket() as listener:  # the kernel accepts the connection; nobody ever answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        with pytest.raises(SourceError, match=r"no answer: .*\(timed out; 3 attempts\)") as err:
            fingerprint(_with_secrets(f"http://127.0.0.1:{listener.getsockname()[1]}/x.jsonl"))
    _assert_one_clean_line(err)


def test_malformed_url_is_a_source_error() -> None:
    with pytest.raises(SourceError, match="not a valid URL") as err:
        fingerprint("http://user:secretpw@127.0.0.1:notaport/x.jsonl?sig=SECRETTOKEN")
    _assert_one_clean_line(err)


@pytest.mark.integration
def test_basic_auth_follows_redirects_on_the_same_origin_only(serve) -> None:  # noqa: ANN001
    origin, other = serve(), serve()
    origin.redirect_to = f"{origin.url}/x.jsonl"
    fingerprint(_with_secrets(f"{origin.url}/redirect"))
    auth = "Basic " + base64.b64encode(b"user:secretpw").decode()
    assert origin.requests == [("HEAD", "/redirect?sig=SECRETTOKEN", auth), ("HEAD", "/x.jsonl", auth)]

    origin.redirect_to = f"{other.url}/x.jsonl"
    fingerprint(_with_secrets(f"{origin.url}/redirect"))
    assert other.requests == [("HEAD", "/x.jsonl", None)]  # the password stays with the server it was meant for


@pytest.mark.integration
def test_fetch_downloads_with_credentials(site: Site, tmp_path: Path) -> None:
    path = sources.fetch(_with_secrets(f"{site.url}/x.jsonl"), tmp_path)
    assert path == tmp_path / "x.jsonl" and path.read_bytes() == site.body
    assert site.requests[-1][2] == "Basic " + base64.b64encode(b"user:secretpw").decode()


# --- redaction ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://user:pw@host/x.jsonl?X-Amz-Signature=abc", "https://<redacted>@host/x.jsonl?<redacted>"),
        ("https://token@host:8443/x.jsonl", "https://<redacted>@host:8443/x.jsonl"),
        ("https://host/x.jsonl?sig=abc#part", "https://host/x.jsonl?<redacted>#part"),
        ("https://host/x?email=a@b.c", "https://host/x?<redacted>"),  # an @ in the query is not user info
        ("https://host/@scope/x.jsonl#sha256=ab", "https://host/@scope/x.jsonl#sha256=ab"),  # nor in the path
        ("https://u:p@host?q=1", "https://<redacted>@host?<redacted>"),
        ("https://[::1/x?q=1", "https://[::1/x?<redacted>"),  # malformed: still redacted, no exception
        ("https://host/x.jsonl", "https://host/x.jsonl"),
        ("/data/a@b?.jsonl", "/data/a@b?.jsonl"),  # a local path is a name, not a URL
    ],
)
def test_redact(uri: str, expected: str) -> None:
    assert redact(uri) == expected
    assert is_redacted(redact(uri)) == (expected != uri)
