"""The register stage against a Kubeflow Model Registry: the real `model-registry` client talking to stand-in
servers on loopback (API v1 and v1alpha3) whose requests and responses are checked against the server's
published OpenAPI documents."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("model_registry")

from lora_pipeline import pipeline  # noqa: E402
from lora_pipeline.config import Config, RegistryConfig  # noqa: E402
from lora_pipeline.errors import ConfigError, RegistryError  # noqa: E402
from lora_pipeline.files import read_json  # noqa: E402
from lora_pipeline.preflight import check_registry  # noqa: E402
from lora_pipeline.registry import kubeflow  # noqa: E402
from lora_pipeline.stages.register import register_adapter  # noqa: E402
from registry_standin import APIS, StandIn  # noqa: E402
from test_register import digest_of, make_run, retrain_in_place  # noqa: E402

TOKEN = "tok-7d3f9a1c5e"


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubeflow, "RETRY_DELAYS", (0.05, 0.1))
    monkeypatch.delenv("MODEL_REGISTRY_TOKEN", raising=False)
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    monkeypatch.setenv("LORA_PIPELINE_SECRET_REGISTRY_TOKEN", "")  # pipeline.run sets it from registry.token


@pytest.fixture(params=APIS)
def server(request: pytest.FixtureRequest):
    with StandIn(token=TOKEN, lifetime=60, api=request.param) as standin:
        yield standin
    assert standin.invalid == []  # every request and response matched that API version's OpenAPI document


def register(run_dir: Path, server: StandIn, **options) -> dict:
    options = {"address": server.url, "port": server.port, "token": TOKEN, **options}
    out = register_adapter(RegistryConfig(**options), run_dir / "train", run_dir / "eval", run_dir / "register")
    return read_json(out / "registration.json")


@pytest.mark.integration
def test_new_model_is_registered_with_its_lineage(tmp_path: Path, server: StandIn) -> None:
    run_dir = make_run(tmp_path / "run")
    record = register(run_dir, server, model_name="topic", version="1.2.3", author="ana", description="demo")
    assert (record["status"], record["registry_kind"], record["registry"]) == ("registered", "kubeflow", server.url)
    (model,) = server.models.values()
    (version,) = server.versions.values()
    (artifact,) = server.artifacts.values()
    assert (model["name"], model["owner"]) == ("topic", "ana")
    assert (version["name"], version["author"], version["description"]) == ("1.2.3", "ana", "demo")
    assert (artifact["uri"], artifact["modelFormatName"], artifact["modelFormatVersion"]) == (
        str((run_dir / "train" / "adapter").resolve()),
        "pytorch",
        "1.0",
    )
    props = version["customProperties"]
    assert props["dataset_sha256"]["string_value"] == "ab" * 32
    assert props["lora_r"]["int_value"] == "8"
    assert props["eval.demo_topic.acc"]["double_value"] == 0.9
    assert record["model_version_id"] == version["id"] and record["model_artifact_id"] == artifact["id"]
    assert set(server.auth_headers) == {f"Bearer {TOKEN}"}
    assert TOKEN not in (run_dir / "register" / "registration.json").read_text()


@pytest.mark.integration
def test_new_version_of_an_existing_model(tmp_path: Path, server: StandIn) -> None:
    first = register(make_run(tmp_path / "a"), server)
    second = register(make_run(tmp_path / "b"), server, version="1.1.0")
    assert second["status"] == "registered"
    assert second["registered_model_id"] == first["registered_model_id"]
    assert len(server.models) == 1 and len(server.versions) == 2 and len(server.artifacts) == 2


@pytest.mark.integration
def test_duplicate_version_same_artifact_is_a_no_op_and_another_is_refused(tmp_path: Path, server: StandIn) -> None:
    run_dir = make_run(tmp_path / "run")
    first = register(run_dir, server)
    again = register(run_dir, server)
    assert again["status"] == "exists"
    assert again["model_version_id"] == first["model_version_id"]
    posts = [path for method, path in server.requests if method == "POST"]
    assert len(posts) == 3  # model, version, artifact: all from the first registration
    with pytest.raises(RegistryError, match="1.0.0 already exists at .* with other content") as err:
        register(make_run(tmp_path / "other"), server)
    assert err.value.field == "registry.version"
    assert [a["uri"] for a in server.artifacts.values()] == [first["uri"]]  # nothing overwritten


@pytest.mark.integration
def test_503_then_200_is_retried(tmp_path: Path, server: StandIn, caplog: pytest.LogCaptureFixture) -> None:
    server.fail_next = [503, 503]
    with caplog.at_level(logging.WARNING, logger="lora_pipeline"):
        record = register(make_run(tmp_path / "run"), server)
    assert record["status"] == "registered"
    assert sum("HTTP 503" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records) == 2


def closed_port() -> int:
    with socket.socket() as sock:  # a port that nothing listens on once the socket is closed
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_registry_down_is_one_line_after_the_retries(tmp_path: Path) -> None:
    port = closed_port()
    run_dir = make_run(tmp_path / "run")
    started = time.monotonic()
    with pytest.raises(RegistryError) as err:
        register_adapter(
            RegistryConfig(address=f"http://127.0.0.1:{port}"), run_dir / "train", run_dir / "eval", tmp_path / "reg"
        )
    message = str(err.value)
    assert "did not answer after 3 attempts" in message and "lora-pipeline register -o RUN_DIR" in message
    assert "\n" not in message and time.monotonic() - started < 30
    assert not (tmp_path / "reg").exists()
    assert (run_dir / "train" / "adapter" / "adapter_config.json").exists()  # train/eval outputs stay


@pytest.mark.integration
def test_bad_token_is_refused_at_once(tmp_path: Path, server: StandIn) -> None:
    with pytest.raises(RegistryError, match=r"refused the request \(HTTP 401\)") as err:
        register(make_run(tmp_path / "run"), server, token="wrong-token-123")
    assert err.value.field == "registry.token"
    assert len(server.requests) == 1  # not retried
    assert server.models == {}


@pytest.mark.integration
def test_token_from_the_environment(tmp_path: Path, server: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_REGISTRY_TOKEN", TOKEN)
    assert register(make_run(tmp_path / "run"), server, token="")["status"] == "registered"
    assert set(server.auth_headers) == {f"Bearer {TOKEN}"}


@pytest.mark.integration
def test_preflight_reaches_the_registry_and_wants_a_token_for_https(server: StandIn) -> None:
    check_registry(server.url, server.port, token=TOKEN)  # answers: fine
    with pytest.raises(ConfigError, match="is https: set --registry.token") as err:
        check_registry(f"127.0.0.1:{server.port}", 8080)  # a bare host means https, and there is no token
    assert err.value.field == "registry.token"
    with pytest.raises(ConfigError, match=r"refused the request \(HTTP 401\)") as err:
        check_registry(server.url, server.port)  # the API probe is refused without the token: before training
    assert err.value.field == "registry.token" and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="TLS with") as err:
        check_registry(f"https://127.0.0.1:{server.port}", 443, token=TOKEN)  # a plain-http server
    assert err.value.field == "registry.ca_cert"
    for address in ("", "local", "none"):
        check_registry(address, 1)  # nothing to reach


def test_address_forms() -> None:
    assert kubeflow.normalise_address("registry.example", 8080) == ("https://registry.example", 8080)
    assert kubeflow.normalise_address("http://mr:9000/", 8080) == ("http://mr:9000", 9000)


@pytest.mark.integration
def test_register_later_without_retraining(tmp_path: Path, server: StandIn) -> None:
    """`lora-pipeline register -o RUN_DIR` after the registry was down: only the register stage runs."""
    run_dir = make_run(tmp_path / "run")
    config = Config()
    config.registry = RegistryConfig(address=f"http://127.0.0.1:{closed_port()}", token=TOKEN)
    with pytest.raises(RegistryError, match="did not answer"):
        pipeline.run(config, run_dir, stages=("register",))
    manifest = read_json(run_dir / "run.json")
    assert manifest["stages"]["register"]["status"] == "failed" and manifest["status"] == "failed"
    assert "register" in (run_dir / "report.html").read_text()  # the report says how far the run got
    assert TOKEN not in (run_dir / "run.json").read_text()
    config.registry.address, config.registry.port = server.url, server.port
    manifest = pipeline.run(config, run_dir, stages=("register",))
    assert manifest["stages"]["register"]["status"] == "ran"
    assert read_json(run_dir / "register" / "registration.json")["status"] == "registered"


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_a_private_ca_and_a_refused_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with StandIn(token=TOKEN, tls=(cert, key), lifetime=60) as server:
        record = register(make_run(tmp_path / "run"), server, ca_cert=str(cert))
        assert (record["status"], record["registry"]) == ("registered", server.url)
        with pytest.raises(RegistryError, match="TLS with https://127.0.0.1") as err:  # system CAs do not know it
            register(make_run(tmp_path / "other"), server, version="2.0.0")
        assert err.value.field == "registry.ca_cert"
        assert len(server.versions) == 1


@pytest.mark.integration
def test_the_digest_is_recorded_and_decides_no_change(tmp_path: Path, server: StandIn) -> None:
    """A retrain in place keeps the artifact's URI: only the recorded digest tells the content changed."""
    run_dir = make_run(tmp_path / "run")
    first = register(run_dir, server)
    (version,) = server.versions.values()
    assert version["customProperties"]["artifact_sha256"]["string_value"] == digest_of(run_dir / "train" / "adapter")
    assert first["artifact_sha256"] == digest_of(run_dir / "train" / "adapter")
    retrain_in_place(run_dir)
    with pytest.raises(RegistryError, match="1.0.0 already exists at .* with other content") as err:
        register(run_dir, server)
    assert err.value.field == "registry.version" and "no change" not in str(err.value)
    assert len(server.versions) == 1 and len(server.artifacts) == 1  # nothing added, nothing overwritten
    (version,) = server.versions.values()
    assert version["customProperties"]["lora_r"]["int_value"] == "8"


@pytest.mark.integration
def test_auto_is_refused_in_one_line_by_a_model_registry(tmp_path: Path, server: StandIn) -> None:
    with pytest.raises(RegistryError, match="auto applies to the local registry") as err:
        register(make_run(tmp_path / "run"), server, version="auto")
    assert "\n" not in str(err.value) and server.requests == []
