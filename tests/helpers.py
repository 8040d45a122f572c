"""Shared by the tests: training settings, an offline Hub cache, kfp.local, loopback HTTP servers."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from socketserver import BaseRequestHandler

from hypothesis import strategies as st

from lora_pipeline.config import TrainConfig


def train_config(model_dir: Path, **overrides) -> TrainConfig:
    """Seconds of training on the demo model: fp32, one epoch, 8 rows a step, one thread."""
    values = dict(
        model=str(model_dir),
        effective_batch_size=8,
        epochs=1,
        learning_rate=5e-3,
        max_seq_len=128,
        lora_load_in_4bit=False,
        use_liger=False,
        threads=1,
    )
    return TrainConfig(**(values | overrides))


def use_offline_hub_cache(hub: Path, main: str, monkeypatch, tmp_path: Path) -> Path:
    """Point huggingface_hub (offline, as HF_HUB_OFFLINE=1 sets) at `hub`, a cache holding the dataset
    owner/name, whose `main` ref is the commit `main`; datasets' own cache goes under tmp_path."""
    refs = hub / "datasets--owner--name" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(main)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return hub


def run_compiled_pipeline_locally(compiled: Path, tmp_path: Path, use_venv: bool) -> tuple[Path, float]:
    """Run a compiled pipeline YAML with kfp.local's subprocess runner: its pipeline root and the seconds taken."""
    from kfp import components, local  # kfp only for the tests that run a compiled pipeline

    root = tmp_path / "kfp-root"
    local.init(
        runner=local.SubprocessRunner(use_venv=use_venv),
        pipeline_root=str(root),
        workspace_root=str(tmp_path / "kfp-workspace"),
        raise_on_error=True,
    )
    started = time.perf_counter()
    components.load_component_from_file(str(compiled))()  # the parameters' defaults come from -c
    return root, time.perf_counter() - started


@contextmanager
def loopback_server(
    handler: Callable[..., BaseRequestHandler], tls: tuple[str | Path, str | Path] | None = None
) -> Iterator[ThreadingHTTPServer]:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port), https when `tls` = (certificate, key), serving from a
    daemon thread for the block; then shut down, its socket closed and the thread joined, bounded in time."""
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:  # leaving the with closes the socket
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            server.socket = context.wrap_socket(server.socket, server_side=True)
        # a short poll so that shutdown() returns at once (it waits for the loop to notice)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            thread.join(timeout=10)


def base_url(server: ThreadingHTTPServer) -> str:
    """The server's root URL, without a trailing slash."""
    scheme = "https" if isinstance(server.socket, ssl.SSLSocket) else "http"
    return f"{scheme}://127.0.0.1:{server.server_address[1]}"


# Any float, but no subnormals: a library loaded earlier in the session (numba, some BLAS builds) may have set the
# CPU's flush-to-zero mode, and then Hypothesis refuses to draw subnormals at all (FloatingPointError).
FLOATS = st.floats(allow_subnormal=False)
