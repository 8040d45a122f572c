"""oci:// base models against the reference registry (Debian's docker-registry) on loopback, Basic auth on and
off: a modelcar image trained from, an ORAS artifact, layers with whiteouts from a multi-platform index, a wrong
password, a missing tag, an unreachable registry, a tampered blob, a transfer cut midway, and layers whose
entries reach outside. The registry binary is required (scripts/test.sh installs it): without it these fail."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import posixpath
import shutil
import tarfile
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from helpers import loopback_server
from lora_pipeline import files, sources
from lora_pipeline.cli import main
from lora_pipeline.errors import SourceError, UnsafePathError
from lora_pipeline.files import read_json
from lora_pipeline.sources import oci
from lora_pipeline.sources.oci_layers import _link_target
from oci_registry import OCI_INDEX, TAR, BearerFront, CuttingProxy, Registry, free_port, model_layer, tar_layer

PASSWORD = "s3cret-Pa55word"


@pytest.fixture(scope="module")
def open_registry(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    registry = Registry(tmp_path_factory.mktemp("open-registry"))
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    registry = Registry(tmp_path_factory.mktemp("auth-registry"), "puller", PASSWORD)
    yield registry
    registry.stop()


@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(oci.SECRET_ENV, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))  # empty: anonymous
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path / "home"))


def _secret(host: str, user: str = "puller", password: str = PASSWORD) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": token}}})


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.integration
def test_modelcar_image_trains_with_pull_secret(
    demo_assets, auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    base = tar_layer([("bin", None), ("bin/sh", b"#!busybox"), ("models", None), ("models/README", b"old")])
    auth_registry.push_image("demo", "1", [base, model_layer(demo_assets.model_dir)])
    monkeypatch.setenv(oci.SECRET_ENV, _secret(auth_registry.host))
    uri = f"oci://{auth_registry.host}/demo:1"
    run = tmp_path / "run"
    common = ["-o", str(run), "--dataset.data_uri", str(demo_assets.data_file), "--dataset.subset", "16"]
    assert main(["dataset", *common]) == 0
    flags = ["--train.model", uri, "--train.epochs", "1", "--train.effective_batch_size", "8"]
    assert main(["train", *common, *flags, "--train.lora_load_in_4bit", "false", "--train.threads", "1"]) == 0
    base_path = Path(read_json(run / "train" / "adapter" / "adapter_config.json")["base_model_name_or_path"])
    assert base_path.parent == tmp_path / "home" / "models" and base_path.name.startswith("oci-")
    expected = sorted(p.name for p in demo_assets.model_dir.iterdir() if p.is_file())
    assert _files(base_path) == sorted([*expected, ".complete", "README"])  # /models only, not the base's /bin
    everything = capsys.readouterr()
    for path in [*run.rglob("*"), *base_path.rglob("*")]:
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    assert PASSWORD not in everything.out + everything.err
    assert read_json(run / "train" / "metrics.json")["base_model_uri"] == uri

    # An eval pod is not the train pod: where the recorded base is not here, it is fetched again by digest.
    from lora_pipeline.models import recorded_base

    shutil.rmtree(base_path)
    assert recorded_base(str(base_path), uri) == str(base_path) and (base_path / "config.json").is_file()
    assert recorded_base(str(base_path), None) == str(base_path)


@pytest.mark.integration
def test_index_layers_and_whiteouts_apply_in_order(open_registry: Registry, tmp_path: Path) -> None:
    lower = tar_layer(
        [("models/config.json", b"{}"), ("models/old.bin", b"o"), ("models/sub/x", b"x"), ("etc/keep", b"k")]
    )
    upper = tar_layer(
        [("./models/.wh.old.bin", b""), ("models/sub/.wh..wh..opq", b""), ("models/sub/y", b"y"),
         ("models/link", "sub/y"), ("models/abs", "/models/sub/y")]
    )  # fmt: skip
    amd64, _ = open_registry.push_image("layered", "amd64", [lower, upper])
    arm64, _ = open_registry.push_image("layered", "arm64", [tar_layer([("models/config.json", b"[]")])])
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": oci.ACCEPT.split(", ")[1],
                "digest": d,
                "size": 1,
                "platform": {"os": "linux", "architecture": a},
            }
            for d, a in ((arm64, "arm64"), (amd64, "amd64"))
        ],
    }
    open_registry.push_manifest("layered", "multi", index, OCI_INDEX)
    uri = f"oci://{open_registry.host}/layered:multi"
    assert sources.model_fingerprint(uri) == f"oci:{amd64}"
    path = sources.fetch_model(uri, tmp_path / "cache")
    assert _files(path) == [".complete", "config.json", "sub/y"]
    assert (path / "link").read_bytes() == b"y" and (path / "abs").read_bytes() == b"y"  # links kept inside
    (path / "config.json").write_text("marked")  # cached by digest: the second pull downloads nothing
    assert sources.fetch_model(f"oci://{open_registry.host}/layered@{amd64}", tmp_path / "cache") == path
    assert (path / "config.json").read_text() == "marked"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temporary leftovers


@pytest.mark.integration
def test_oras_artifact(demo_assets, open_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import oras.client

    monkeypatch.chdir(demo_assets.model_dir)
    names = sorted(p.name for p in demo_assets.model_dir.iterdir() if p.is_file())
    client = oras.client.OrasClient(hostname=open_registry.host, insecure=True)
    client.push(target=f"{open_registry.host}/artifact:v1", files=names, disable_path_validation=True, quiet=True)
    path = sources.fetch_model(f"oci://{open_registry.host}/artifact:v1", tmp_path / "cache")
    assert _files(path) == sorted([*names, ".complete"])
    assert (path / "config.json").read_bytes() == (demo_assets.model_dir / "config.json").read_bytes()


@pytest.mark.integration
def test_bearer_token_from_the_realm(demo_assets, open_registry: Registry, tmp_path: Path, monkeypatch) -> None:
    open_registry.push_image("demo", "bearer", [model_layer(demo_assets.model_dir)])
    front = BearerFront(open_registry.host, "puller", PASSWORD, "tok-123")
    try:
        host = f"127.0.0.1:{front.port}"
        monkeypatch.setenv(oci.SECRET_ENV, _secret(host))
        path = sources.fetch_model(f"oci://{host}/demo:bearer", tmp_path / "cache")
        assert (path / "config.json").read_bytes() == (demo_assets.model_dir / "config.json").read_bytes()
        assert front.token_queries[0] == "/token?service=front&scope=repository%3Ademo%3Apull"
        monkeypatch.setenv(oci.SECRET_ENV, _secret(host, password="wrong"))
        with pytest.raises(SourceError, match=r"access denied: .* \(HTTP 401 from the token service; "):
            sources.model_fingerprint(f"oci://{host}/demo:bearer")
    finally:
        front.close()


@pytest.mark.integration
def test_pull_deadline_is_kept(open_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_registry.push_image("slow", "1", [tar_layer([("models/config.json", b"{}")])])
    uri = f"oci://{open_registry.host}/slow:1"
    monkeypatch.setenv(oci.DEADLINE_ENV, "1e-9")
    with pytest.raises(SourceError, match=r"^train.model: gave up: oci://.*/slow:1 \(not done within 1e-09 s\)"):
        sources.fetch_model(uri, tmp_path / "cache")
    monkeypatch.setenv(oci.DEADLINE_ENV, "soon")
    with pytest.raises(SourceError, match=rf"^train.model: {oci.DEADLINE_ENV} must be a number of seconds"):
        sources.fetch_model(uri, tmp_path / "cache")


PREFLIGHT_CASES = [
    # id, password, reference, what the one line says
    ("wrong password", "not-it", "demo:1", "access denied: oci://{host}/demo:1 (HTTP 401"),
    ("no credentials", None, "demo:1", "access denied: oci://{host}/demo:1 (HTTP 401"),
    ("missing tag", PASSWORD, "demo:no-such-tag", "not found: oci://{host}/demo:no-such-tag"),
    ("missing repository", PASSWORD, "nothing:1", "not found: oci://{host}/nothing:1"),
    ("unreachable", PASSWORD, "demo:1", "cannot connect: oci://127.0.0.1:{port}/demo:1 (connection refused"),
    ("userinfo", PASSWORD, "demo:1", "credentials and query strings do not belong in oci:// references"),
    ("bad reference", PASSWORD, "Demo::1", "not an OCI reference"),
]


@pytest.mark.parametrize(
    ("password", "ref", "expected"), [c[1:] for c in PREFLIGHT_CASES], ids=[c[0] for c in PREFLIGHT_CASES]
)
@pytest.mark.integration
def test_preflight_refuses_in_one_line(
    demo_assets, auth_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys,
    password: str | None, ref: str, expected: str,
) -> None:  # fmt: skip
    auth_registry.push_image("demo", "1", [model_layer(demo_assets.model_dir)])
    port = free_port()
    host = f"127.0.0.1:{port}" if "unreachable" in expected or "connect" in expected else auth_registry.host
    if password:
        monkeypatch.setenv(oci.SECRET_ENV, _secret(host, password=password))
    uri = f"oci://{host}/{ref}"
    if "do not belong" in expected:
        uri = f"oci://puller:{PASSWORD}@{host}/{ref}"
    run = tmp_path / "run"
    code = main(["run", "-o", str(run), "--dataset.data_uri", str(demo_assets.data_file), "--train.model", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lora-pipeline: error: train.model: ")
    assert expected.format(host=host, port=port) in err[0]
    assert PASSWORD not in err[0] and "not-it" not in err[0]
    assert not run.exists()


@pytest.mark.integration
def test_tampered_blob_is_refused(open_registry: Registry, tmp_path: Path) -> None:
    _, (layer,) = open_registry.push_image("tampered", "1", [tar_layer([("models/config.json", b"{}" * 100)])])
    blob = open_registry.blob_path(layer)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes
    blob.write_bytes(bytes(data))
    with pytest.raises(SourceError, match=rf"^train.model: digest mismatch: layer {layer} of oci://"):
        sources.fetch_model(f"oci://{open_registry.host}/tampered:1", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.integration
def test_cut_transfer_fails_cleanly_then_the_next_pull_succeeds(open_registry: Registry, tmp_path: Path) -> None:
    digest, _ = open_registry.push_image(
        "cut", "1", [tar_layer([("models/config.json", os.urandom(4096).hex().encode())])]
    )
    proxy = CuttingProxy(open_registry.port)
    try:
        uri = f"oci://127.0.0.1:{proxy.port}/cut:1"
        with pytest.raises(
            SourceError, match=r"^train.model: transfer failed: oci://.*/cut:1 \(IncompleteRead.*3 attempts"
        ):
            sources.fetch_model(uri, tmp_path / "cache")
        assert list((tmp_path / "cache").iterdir()) == []
        proxy.cut = False
        stale = tmp_path / "cache" / f".oci-{digest[7:39]}.tmp-{2**22 + 1}-{files._HOST}-x"  # a killed pull's
        stale.mkdir(parents=True)
        path = sources.fetch_model(uri, tmp_path / "cache")
        assert not stale.exists()
        assert _files(path) == [".complete", "config.json"]
    finally:
        proxy.close()


UNSAFE_LAYERS = [
    ("dot-dot", [("models/config.json", b"{}"), ("../evil", b"x")], "climbs out"),
    ("absolute", [("/evil", b"x")], "climbs out|absolute"),
    ("link out", [("models/config.json", b"{}"), ("models/up", "../../../evil")], "links outside the image"),
    ("whiteout of its folder", [("models/config.json", b"{}"), ("models/.wh..", b"")], "names no entry"),
    ("whiteout out", [("models/config.json", b"{}"), ("models/.wh...", b"")], "names no entry"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("entries", "why"), [c[1:] for c in UNSAFE_LAYERS], ids=[c[0] for c in UNSAFE_LAYERS])
def test_layer_entries_outside_are_refused(open_registry: Registry, tmp_path: Path, entries: list, why: str) -> None:
    repo = "unsafe"
    open_registry.push_image(repo, "1", [tar_layer(entries, gzip=False)], media=TAR)
    with pytest.raises(UnsafePathError, match=rf"^train.model: oci://.*: .*({why}).*refused"):
        sources.fetch_model(f"oci://{open_registry.host}/{repo}:1", tmp_path / "cache")
    assert not (tmp_path / "evil").exists() and list((tmp_path / "cache").iterdir()) == []


@pytest.mark.integration
def test_device_file_is_refused(open_registry: Registry, tmp_path: Path) -> None:
    layer = tar_layer([("models/config.json", b"{}"), ("models/null", b"")], gzip=False, kind=tarfile.CHRTYPE)
    open_registry.push_image("device", "1", [layer], media=TAR)
    with pytest.raises(UnsafePathError, match=r"is not a file, directory or link \(device or fifo\); refused"):
        sources.fetch_model(f"oci://{open_registry.host}/device:1", tmp_path / "cache")


CREDENTIAL_CASES = [
    # id, config content, expected (user, password) for registry.example:5000
    ("auth", {"auths": {"registry.example:5000": {"auth": base64.b64encode(b"u:p:w").decode()}}}, ("u", "p:w")),
    ("fields", {"auths": {"https://registry.example:5000/v1/": {"username": "u", "password": "p"}}}, ("u", "p")),
    ("other host", {"auths": {"registry.example": {"username": "u", "password": "p"}}}, None),
    ("no auths", {"credsStore": "desktop"}, None),
]
HUB = {"auths": {"https://index.docker.io/v1/": {"username": "u", "password": "p"}}}


@pytest.mark.parametrize(
    ("content", "expected"), [c[1:] for c in CREDENTIAL_CASES], ids=[c[0] for c in CREDENTIAL_CASES]
)
def test_credentials_from_env_or_docker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content, expected
) -> None:
    monkeypatch.setenv(oci.SECRET_ENV, json.dumps(content))
    assert oci.credentials("registry.example:5000") == expected
    monkeypatch.setenv(oci.SECRET_ENV, json.dumps(HUB))  # `docker login`'s key for Docker Hub
    assert oci.credentials("docker.io") == ("u", "p") and oci.credentials("registry.example:5000") is None
    monkeypatch.delenv(oci.SECRET_ENV)
    (tmp_path / "docker-config").mkdir()
    (tmp_path / "docker-config" / "config.json").write_text(json.dumps(content))
    assert oci.credentials("registry.example:5000") == expected


def test_unreadable_pull_secret_is_named_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(oci.SECRET_ENV, '{"auths": "hunter2-not-json')
    with pytest.raises(SourceError) as caught:
        oci.credentials("h:1")
    assert (
        str(caught.value) == f'train.model: {oci.SECRET_ENV} is not a docker config.json (a JSON object with "auths")'
    )


@pytest.mark.parametrize(
    ("host", "plain", "scheme"),
    [
        ("127.0.0.1:5000", "", "http"),
        ("localhost", "", "http"),
        ("quay.io", "", "https"),
        ("reg.svc:5000", "1", "http"),
    ],
)
def test_http_only_for_loopback_or_when_told(
    monkeypatch: pytest.MonkeyPatch, host: str, plain: str, scheme: str
) -> None:
    monkeypatch.setenv(oci.PLAIN_HTTP_ENV, plain)
    ref = oci.parse(f"oci://{host}/org/model:v1")
    assert (ref.scheme, ref.host, ref.repo, ref.ref) == (scheme, host, "org/model", "v1")
    monkeypatch.delenv(oci.PLAIN_HTTP_ENV)
    hub = oci.parse("oci://docker.io/busybox")
    assert (hub.repo, hub.ref, hub.url("manifests", "latest")) == (
        "library/busybox",
        "latest",
        "https://registry-1.docker.io/v2/library/busybox/manifests/latest",
    )


_SEGMENT = st.sampled_from(["a", "b", "..", ".", "", "models"])


@settings(max_examples=60, deadline=None)
@given(st.lists(_SEGMENT, min_size=1, max_size=4), st.lists(_SEGMENT, min_size=1, max_size=5), st.booleans())
def test_symlink_targets_stay_inside(name: list[str], link: list[str], absolute: bool) -> None:
    entry = "/".join(s for s in name if s not in ("..", ".", "")) or "x"
    target = ("/" if absolute else "") + "/".join(link)
    try:
        kept = _link_target(Path("/root"), entry, target, "oci://h/r:t")
    except UnsafePathError:
        return
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(entry), kept))
    assert not resolved.startswith("/") and resolved != ".." and not resolved.startswith("../")


_NAMES = st.lists(
    st.sampled_from(["models", "a", "b", "..", ".", "", ".wh.a", ".wh..wh..opq", "/"]), min_size=1, max_size=4
)
_ENTRY = st.tuples(st.sampled_from(["file", "dir", "symlink", "hardlink"]), _NAMES, _NAMES)


@settings(max_examples=50, deadline=None)
@given(st.lists(_ENTRY, min_size=1, max_size=6))
@example([("symlink", ["models", "."], ["/"])])  # found by this test: a link one level above the image
def test_any_layer_stays_inside_or_is_refused(tmp_path_factory: pytest.TempPathFactory, entries: list) -> None:
    import io

    from lora_pipeline.sources.oci_layers import apply_layer

    work = tmp_path_factory.mktemp("layer")
    root, blob = work / "root", work / "layer.tar"
    root.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for kind, name, link in entries:
            info = tarfile.TarInfo("/".join(name))
            info.type = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
                         "hardlink": tarfile.LNKTYPE}[kind]  # fmt: skip
            info.linkname = "/".join(link)
            tf.addfile(info, io.BytesIO(b"") if kind == "file" else None)
    blob.write_bytes(buffer.getvalue())
    with contextlib.suppress(SourceError):
        apply_layer(blob, {"mediaType": TAR, "digest": "sha256:x"}, root, "oci://h/r:t")
    assert sorted(p.name for p in work.iterdir()) == ["layer.tar", "root"]  # nothing written beside root
    for path in root.rglob("*"):  # every link leads inside (a loop inside is harmless: realpath stops there)
        assert Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root)), path


def test_compile_refuses_oci_userinfo_and_names_the_pull_secret(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.yaml"
    uri = f"oci://puller:{PASSWORD}@quay.io/org/model:1"
    code = main(["compile", "-o", str(out), "--dataset.data_uri", "s3://b/x.jsonl", "--train.model", uri])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and PASSWORD not in err
    assert "--secret-env OCI_PULL_SECRET_MODEL_DOWNLOAD=SECRET:.dockerconfigjson for oci://" in err


@pytest.mark.integration
def test_server_errors_are_retried_then_named(tmp_path: Path) -> None:
    import http.server

    answers: list[str] = []

    class Failing(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            answers.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with loopback_server(Failing) as server:
        uri = f"oci://127.0.0.1:{server.server_address[1]}/demo:1"
        with pytest.raises(
            SourceError, match=r"^train.model: registry error: oci://.*/demo:1 \(HTTP 503; 3 attempts\)$"
        ):
            sources.model_fingerprint(uri)
        assert answers == ["/v2/demo/manifests/1"] * 3
