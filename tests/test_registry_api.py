"""Issue 21 §2: every Kubeflow Model Registry a user may have. The real `model-registry` client against
stand-ins built from the server's published OpenAPI documents (v1 and v1alpha3), the address rules, the
merged model as a second artifact, the pipeline run as provenance, and `models delete`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("model_registry")

from lora_pipeline.cli import main  # noqa: E402
from lora_pipeline.config import RegistryConfig  # noqa: E402
from lora_pipeline.errors import ConfigError, RegistryError  # noqa: E402
from lora_pipeline.files import read_json  # noqa: E402
from lora_pipeline.preflight import check_registry  # noqa: E402
from lora_pipeline.registry import kubeflow, mr_api  # noqa: E402
from lora_pipeline.registry.local import LocalRegistry  # noqa: E402
from lora_pipeline.stages.register import register_adapter  # noqa: E402
from registry_standin import APIS, DOCS, StandIn, document, schema_errors  # noqa: E402
from test_register import make_run  # noqa: E402

TOKEN = "tok-5b1e2c9d7a"
IN_CLUSTER = "model-registry-service.kubeflow.svc.cluster.local"  # the spec's address, with its port 8080


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubeflow, "RETRY_DELAYS", (0.05,))
    for name in ("MODEL_REGISTRY_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH", "LORA_PIPELINE_KFP_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("LORA_PIPELINE_KFP_RUN_NAME", raising=False)
    monkeypatch.setenv("LORA_PIPELINE_SECRET_REGISTRY_TOKEN", "")


@pytest.fixture(params=APIS)
def server(request: pytest.FixtureRequest):
    with StandIn(token=TOKEN, lifetime=60, api=request.param) as standin:
        yield standin
    assert standin.invalid == []  # every request and response matched that version's OpenAPI document


def register(run_dir: Path, server: StandIn, **options) -> dict:
    options = {"address": server.url, "port": server.port, "token": TOKEN, **options}
    out = register_adapter(RegistryConfig(**options), run_dir / "train", run_dir / "eval", run_dir / "register")
    return read_json(out / "registration.json")


def add_merged(run_dir: Path, weights: bytes = b"merged weights") -> Path:
    merged = run_dir / "train" / "merged"
    merged.mkdir(exist_ok=True)
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(weights)
    return merged


# --- API versions ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_registers_through_the_client_in_the_servers_own_api_version(tmp_path: Path, server: StandIn) -> None:
    record = register(make_run(tmp_path / "run"), server)
    assert record["status"] == "registered"
    (version,) = server.versions.values()
    assert version["customProperties"]["base_model"]["string_value"] == "/models/base"
    asked = mr_api.APIS[: mr_api.APIS.index(server.api) + 1]  # detection asks v1 first, then v1alpha3
    probes = len(asked)
    probed = [path for _, path in server.requests[:probes]]
    assert probed == [f"/api/model_registry/{a}/registered_models" for a in asked]
    after = [path for _, path in server.requests[probes:]]
    assert len(after) > 3 and all(path.startswith(server.prefix + "/") for path in after)  # the client's calls
    check_registry(server.url, server.port, token=TOKEN)  # pre-flight detects it too


@pytest.mark.integration
def test_a_server_with_neither_api_is_refused_in_one_line(tmp_path: Path) -> None:
    with StandIn(token=TOKEN, lifetime=30) as other:
        other.routes = {}  # answers 404 under every prefix, as a server of another API version would
        with pytest.raises(ConfigError, match="speaks the Kubeflow Model Registry REST API v1 and v1alpha3") as err:
            check_registry(other.url, other.port, token=TOKEN)
        assert "\n" not in str(err.value) and err.value.field == "registry.address"
        with pytest.raises(RegistryError, match="v1 and v1alpha3"):
            register(make_run(tmp_path / "run"), other)
        assert other.models == {}


# --- the stand-in's documents ---------------------------------------------------------------------------


@pytest.mark.parametrize("api", APIS)
def test_the_documents_name_their_source_and_the_v1_routes_are_the_clients(api: str) -> None:
    doc = document(api)
    assert doc["info"]["version"] == api and "kubeflow/model-registry" in doc["info"]["x-source"]
    assert all(path.startswith(f"/api/model_registry/{api}/") for path in doc["paths"])
    if api == "v1":
        client = Path(__import__("mr_openapi").__file__).parent / "api" / "model_registry_service_api.py"
        for path in doc["paths"]:
            assert f'resource_path="{path.replace("{modelversionId}", "{model_version_id}")}"' in client.read_text()


@pytest.mark.parametrize("api", APIS)
def test_the_stand_in_refuses_what_its_document_refuses(api: str) -> None:
    create = {"$ref": "#/components/schemas/ModelVersionCreate"}
    assert schema_errors(api, create, {"name": "1.0.0", "registeredModelId": "1"}) == []
    assert schema_errors(api, create, {"registeredModelId": "1"})  # name is required
    assert schema_errors(api, create, {"name": "1.0.0", "registeredModelId": "1", "colour": "red"})  # undeclared
    value = {"$ref": "#/components/schemas/MetadataValue"}
    assert schema_errors(api, value, {"metadataType": "MetadataIntValue", "int_value": "7"}) == []
    assert schema_errors(api, value, {"metadataType": "MetadataIntValue", "string_value": "7"})
    assert (DOCS / "reduce.py").is_file()


# --- address rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "port", "expected"),
    [
        (IN_CLUSTER, 8080, (f"http://{IN_CLUSTER}", 8080)),
        ("model-registry-service.kubeflow.svc", 8080, ("http://model-registry-service.kubeflow.svc", 8080)),
        ("model-registry-service", 8080, ("http://model-registry-service", 8080)),
        ("model-registry-service:9090", 8080, ("http://model-registry-service:9090", 9090)),
        ("registry.example.com", 443, ("https://registry.example.com", 443)),
        ("127.0.0.1:8443", 8080, ("https://127.0.0.1:8443", 8443)),
        ("svc.example.com", 8080, ("https://svc.example.com", 8080)),
        ("http://registry.example.com", 8080, ("http://registry.example.com", 8080)),
        ("https://mr.kubeflow.svc.cluster.local/", 8443, ("https://mr.kubeflow.svc.cluster.local", 8443)),
        ("http://mr:9000/", 8080, ("http://mr:9000", 9000)),
    ],
)  # fmt: skip
def test_address_rules(address: str, port: int, expected: tuple[str, int]) -> None:
    assert kubeflow.normalise_address(address, port) == expected


@settings(max_examples=40, deadline=None)
@given(
    host=st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,8}){0,3}", fullmatch=True),
    scheme=st.sampled_from(["", "http://", "https://"]),
)
def test_a_prefix_decides_else_in_cluster_means_http(host: str, scheme: str) -> None:
    url, port = kubeflow.normalise_address(scheme + host, 8080)
    in_cluster = "." not in host or host.endswith((".svc", ".svc.cluster.local"))
    assert url == (scheme or ("http://" if in_cluster else "https://")) + host and port == 8080


# --- provenance -----------------------------------------------------------------------------------------


@pytest.mark.integration
def test_the_compiled_register_task_gets_the_pipeline_run(tmp_path: Path) -> None:
    import yaml

    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "-o", str(out)]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    task = spec["components"]["comp-condition-1"]["dag"]["tasks"]["register-model"]
    inputs = {k: v.get("runtimeValue", {}).get("constant") for k, v in task["inputs"]["parameters"].items()}
    assert inputs["pipeline_run_id"] == "{{$.pipeline_job_uuid}}"
    assert inputs["pipeline_run_name"] == "{{$.pipeline_job_name}}"


@pytest.mark.integration
def test_the_version_records_the_pipeline_run(tmp_path: Path, server: StandIn, monkeypatch) -> None:
    monkeypatch.setenv("LORA_PIPELINE_KFP_RUN_ID", "8c1f0b9e-run")
    monkeypatch.setenv("LORA_PIPELINE_KFP_RUN_NAME", "lora-pipeline-2026-12-05")
    register(make_run(tmp_path / "run"), server)
    (version,) = server.versions.values()
    props = {k: v.get("string_value") for k, v in version["customProperties"].items()}
    assert props["pipeline_run_id"] == "8c1f0b9e-run" and props["pipeline_run_name"] == "lora-pipeline-2026-12-05"
    assert props["dataset_sha256"] and props["base_model"] == "/models/base"  # beside today's lineage


# --- the merged model: a second artifact, added, never replaced -----------------------------------------


@pytest.mark.integration
def test_kubeflow_holds_the_merged_model_as_a_second_artifact(tmp_path: Path, server: StandIn) -> None:
    run = make_run(tmp_path / "run")
    merged = add_merged(run)
    record = register(run, server, format_name="safetensors", format_version="2")
    assert len(server.versions) == 1 and len(server.artifacts) == 2
    by_name = {a["name"]: a for a in server.artifacts.values()}
    assert by_name["lora-model-merged"]["uri"] == str(merged.resolve())
    assert (
        by_name["lora-model-merged"]["customProperties"]["artifact_sha256"]["string_value"] == record["merged_sha256"]
    )
    assert {a["modelFormatName"] for a in by_name.values()} == {"safetensors"}
    assert register(run, server)["status"] == "exists" and len(server.artifacts) == 2  # nothing added twice
    add_merged(run, b"another merge")
    with pytest.raises(RegistryError, match="already holds a merged model with other content"):
        register(run, server)
    assert len(server.artifacts) == 2 and by_name["lora-model-merged"]["uri"] == str(merged.resolve())


def test_local_registry_holds_the_merged_model_too(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, db = make_run(tmp_path / "run"), tmp_path / "reg" / "registry.db"
    register_adapter(RegistryConfig(address="local", path=str(db)), run / "train", run / "eval", run / "register")
    registry = LocalRegistry(db)
    assert registry.artifacts(registry.version("lora-model")["version_id"]) == []  # no merge: adapter only
    add_merged(run)
    register_adapter(RegistryConfig(address="local", path=str(db)), run / "train", run / "eval", run / "register")
    (extra,) = registry.artifacts(registry.version("lora-model")["version_id"])  # added to the same version
    assert extra["name"] == "lora-model-merged" and Path(extra["uri"]).parent.parent == db.parent / "blobs"
    assert main(["models", "--path", str(db), "show", "lora-model"]) == 0
    shown = capsys.readouterr().out
    assert f"merged          {extra['uri']}" in shown and f"sha256 {extra['digest']}  OK" in shown
    add_merged(run, b"another merge")
    with pytest.raises(RegistryError, match="nothing was replaced"):
        register_adapter(RegistryConfig(address="local", path=str(db)), run / "train", run / "eval", run / "register")
    assert registry.artifacts(registry.version("lora-model")["version_id"]) == [extra]


# --- models delete --------------------------------------------------------------------------------------


def test_models_delete_removes_the_version_and_the_copies_only_it_used(tmp_path: Path, capsys) -> None:
    db = tmp_path / "reg" / "registry.db"

    def reg(run: Path, name: str = "lora-model") -> str:
        cfg = RegistryConfig(address="local", path=str(db), model_name=name, version="auto")
        register_adapter(cfg, run / "train", run / "eval", run / "register")
        return read_json(run / "register" / "registration.json")["uri"]

    first, second = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    add_merged(first)
    uri_a, uri_b = reg(first), reg(second)
    shared = reg(first, name="other-model")  # the same adapter under another name: one copy, two versions
    assert shared == uri_a
    merged_copy = Path(
        LocalRegistry(db).artifacts(LocalRegistry(db).version("lora-model", "1.0.0")["version_id"])[0]["uri"]
    )
    assert main(["models", "--path", str(db), "delete", "lora-model", "1.0.0"]) == 0
    assert "deleted lora-model 1.0.0" in capsys.readouterr().out
    assert Path(uri_a).is_dir() and merged_copy.is_dir()  # other-model 1.0.0 holds the same adapter and merge
    assert [r["version"] for r in LocalRegistry(db).versions("lora-model")] == ["1.0.1"] and Path(uri_b).is_dir()
    assert main(["models", "--path", str(db), "delete", "other-model", "1.0.0"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not Path(uri_a).exists() and not merged_copy.exists() and Path(uri_b).is_dir()
    assert first.joinpath("train", "adapter").is_dir() and first.joinpath("train", "merged").is_dir()  # a run's own
    assert main(["models", "--path", str(db), "list"]) == 0 and "other-model" not in capsys.readouterr().out
    assert main(["models", "--path", str(db), "delete", "lora-model", "9.9.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no version '9.9.9'" in err and "\n" not in err and "Traceback" not in err
    shutil.rmtree(tmp_path / "reg")
