"""Every wait on the network ends: loopback servers that accept and never answer, or drip a byte at a time,
against small limits set through the options. One line, exit 2, in bounded time (the bounds are generous:
these check that a wait ends, not how fast)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lora_pipeline.cli import main

BOUND_S = 30  # far above every limit set below, far below the minutes or days these waits used to take


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port whose connections the kernel accepts and nobody ever answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@contextlib.contextmanager
def http_server(body: Callable[[socket.socket], None], length: int, etag: bool = True) -> Iterator[str]:
    """An HTTP server answering HEAD with an ETag (the source check passes at once; without one, the check
    hashes the body) and GET with `length` announced and the body written by `body`."""
    validator = 'ETag: "v1"\r\n' if etag else ""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def handle(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = conn.recv(65536)
            conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n{validator}\r\n".encode())
            if not request.startswith(b"HEAD"):
                body(conn)

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/data.jsonl"
    finally:
        stop.set()
        listener.close()


def drip(conn: socket.socket) -> None:
    for _ in range(200):
        time.sleep(0.1)
        conn.sendall(b"{")


def stay_silent(conn: socket.socket) -> None:
    time.sleep(BOUND_S)


def _dataset(uri: str, tmp_path: Path, capsys: pytest.CaptureFixture, *options: str) -> tuple[int, list[str], float]:
    started = time.monotonic()
    code = main(["dataset", "--dataset.data_uri", uri, "--out", str(tmp_path / "ds"), *options])
    return code, capsys.readouterr().err.strip().splitlines(), time.monotonic() - started


@pytest.mark.parametrize(
    ("body", "options", "expected"),
    [
        (drip, ["--dataset.timeout", "0.5"], "stalled: .* under 1 KiB per dataset.timeout; 3 attempts"),
        (drip, ["--dataset.timeout", "5", "--dataset.deadline", "1"], r"gave up: .*dataset.deadline, 1 s"),
        (stay_silent, ["--dataset.timeout", "0.5"], r"no answer: .*timed out; 3 attempts"),
        (stay_silent, ["--dataset.timeout", "5", "--dataset.deadline", "1.5"], r"gave up: .*dataset.deadline"),
    ],
    ids=["drip-stalls", "drip-deadline", "silent-body-times-out", "silent-body-deadline"],
)
@pytest.mark.integration
def test_http_download_that_never_finishes_ends_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, body: Callable, options: list[str], expected: str
) -> None:
    import re

    with http_server(body, 10_000) as uri:
        code, err, elapsed = _dataset(uri, tmp_path, capsys, *options)
    assert code == 2 and len(err) == 1 and re.search(expected, err[-1]), err
    assert elapsed < BOUND_S and not (tmp_path / "ds").exists()


@pytest.mark.integration
def test_source_check_of_a_dripping_body_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_pipeline import sources
    from lora_pipeline.errors import SourceError

    monkeypatch.setattr("lora_pipeline.sources.http.CHECK_DEADLINE_S", 1.0)
    with http_server(drip, 10_000, etag=False) as uri:  # no validators: the check hashes the body
        started = time.monotonic()
        with pytest.raises(SourceError, match="gave up: .*the source check's limit, 1 s"):
            sources.fingerprint(uri)
    assert time.monotonic() - started < BOUND_S


@pytest.mark.integration
def test_http_download_prints_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    rows = b"".join(b'{"text": "row %05d"}\n' % i for i in range(4000))  # 84 KB, sent over ~1.5 s

    def slowly(conn: socket.socket) -> None:
        for start in range(0, len(rows), len(rows) // 20):
            conn.sendall(rows[start : start + len(rows) // 20])
            time.sleep(0.08)

    caplog.set_level(logging.INFO, logger="lora_pipeline.sources.http")
    with http_server(slowly, len(rows)) as uri:
        code, err, _ = _dataset(uri, tmp_path, capsys, "--dataset.timeout", "5")
    assert code == 0, err
    lines = [r.getMessage() for r in caplog.records if r.name == "lora_pipeline.sources.http"]
    assert any(f" of {len(rows):,} B (" in line and "%, " in line and " B/s)" in line for line in lines), lines


@pytest.mark.integration
def test_silent_registry_gives_up_within_registry_timeout(tmp_path: Path) -> None:
    pytest.importorskip("model_registry")
    from lora_pipeline.config import RegistryConfig
    from lora_pipeline.errors import RegistryError
    from lora_pipeline.stages.register import register_adapter
    from test_register import make_run

    run_dir = make_run(tmp_path / "run")
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(RegistryError) as err:
            cfg = RegistryConfig(address=f"http://127.0.0.1:{port}", timeout=1.0)
            register_adapter(cfg, run_dir / "train", run_dir / "eval", tmp_path / "reg")
        elapsed = time.monotonic() - started
    message = str(err.value)
    assert "no answer within registry.timeout, 1 s" in message and "\n" not in message, message
    assert elapsed < BOUND_S and not (tmp_path / "reg").exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "abc", "inf", "1e308"])
def test_timeouts_must_be_positive_seconds(value: str, capsys: pytest.CaptureFixture) -> None:
    for option in ("--registry.timeout", "--dataset.timeout"):
        assert main(["run", "--print_config", option, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and option.lstrip("-") in err[0], err
    with pytest.raises(SystemExit) as exited:  # argparse's own error: it exits
        main(["compile", "--trainjob", "--submit", "--timeout", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--timeout" in err[0], err


@pytest.mark.integration
def test_trainjob_submit_to_a_silent_api_server_ends_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("kubeflow.trainer")
    with silent_server() as port:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", f"http://127.0.0.1:{port}")
        started = time.monotonic()
        code = main(["compile", "--trainjob", "--submit", "--namespace", "ns", "--timeout", "1",
                     "--train.num_workers", "2"])  # fmt: skip
        elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "did not answer within 1 s" in err[0], err
    assert elapsed < BOUND_S


def test_hf_fetch_waits_dataset_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    from lora_pipeline import sources
    from lora_pipeline.errors import SourceError

    seen: dict[str, float] = {}

    def snapshot_download(*args: object, **kwargs: float) -> str:
        seen.update(etag=kwargs["etag_timeout"], download=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        raise TimeoutError("read timed out")

    before = constants.HF_HUB_DOWNLOAD_TIMEOUT
    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    with pytest.raises(SourceError, match="cannot reach the Hugging Face Hub for owner/name"):
        sources.fetch("hf://owner/name", tmp_path, sources.Limits(timeout=7))
    assert seen == {"etag": 7, "download": 7} and before == constants.HF_HUB_DOWNLOAD_TIMEOUT
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "3")  # the variable, when set, is the user's choice
    with pytest.raises(SourceError):
        sources.fetch("hf://owner/name", tmp_path, sources.Limits(timeout=7))
    assert seen == {"etag": 7, "download": before}
