"""The training component's multi-node path against a stand-in Kubernetes API server (tests/k8s_standin.py),
driven through the real `kubernetes` client and `kubeflow` TrainerClient: every TrainJob it sends is validated
against the TrainJob CRD of the Trainer release it meets (v2.1: podTemplateOverrides, v2.3: runtimePatches)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from k8s_standin import KubeStandin, validator
from lora_pipeline.kubeflow import trainjob_run
from lora_pipeline.kubeflow.runtime import run_component
from lora_pipeline.kubeflow.trainjob_run import SETTINGS_ENV, settings_env

SECRETS = (("WANDB_API_KEY", "wandb", "api-key"),)
OPTIONAL = (("HF_TOKEN", "hf-token", "HF_TOKEN"), ("AWS_ACCESS_KEY_ID", "aws-credentials", "AWS_ACCESS_KEY_ID"))


class Artifact:
    def __init__(self, path: Path) -> None:
        self.path, self.metadata, self.metrics = str(path), {}, {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value


def nodes_train(job: dict[str, Any]) -> None:
    """What the nodes would do: write a train stage's output where the node command says."""
    command = job["spec"]["trainer"]["command"]
    argv = shlex.split(command[-1].split(" && exec ", 1)[1]) if command[0] == "sh" else command
    out = Path(argv[argv.index("--out") + 1])
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "m", "r": 8}))
    (out / "metrics.json").write_text(json.dumps({"final_loss": 1.5, "steps": 2}))
    (out / "loss_chart.html").write_text("<html></html>")


@pytest.fixture
def component(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The training component's arguments on a workspace, its dataset input, and the settings compile wrote."""
    monkeypatch.setattr(trainjob_run, "POLL_S", 0.0)
    monkeypatch.setenv("KUBERNETES_AUTH_TOKEN", "t0ken-1234")
    monkeypatch.setenv("KUBERNETES_NAMESPACE", "ml")
    monkeypatch.delenv("KUBERNETES_CA_CERT", raising=False)
    wheel = tmp_path / "pod" / "lora_pipeline-0.1.0-py3-none-any.whl"  # the embedded wheel, in the pod
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK")
    monkeypatch.setenv(SETTINGS_ENV, settings_env("img:1", f"{wheel}[kubeflow]", ("http://index",), SECRETS, OPTIONAL))
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "train.jsonl").write_text('{"text": "x"}\n')
    run = tmp_path / "outputs" / "task-123"
    return {
        "pvc_path": str(tmp_path / "workspace"),
        "output_model": Artifact(run / "output_model"),
        "output_metrics": Artifact(run / "metrics"),
        "output_loss_chart": Artifact(run / "chart.html"),
        "dataset": Artifact(dataset),
        "kubernetes_config": {"volumes": [{"name": "ws", "persistentVolumeClaim": {"claimName": "ws-pvc"}}]},
    }


FIXED = {"num_workers": 2, "labels": "team=ml", "annotations": "owner=alice"}


@pytest.mark.integration
@pytest.mark.parametrize("release, patch_api", [("v2.1.0", "podTemplateOverrides"), ("v2.3.0", "runtimePatches")])
def test_submit_wait_logs_copy_delete(
    component: dict[str, Any], release: str, patch_api: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    with KubeStandin(release, token="t0ken-1234", on_running=nodes_train) as k8s:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", k8s.url)
        assert run_component("train", component, FIXED) == "training completed"
    assert k8s.rejected == [] and len(k8s.created) == 1
    job = k8s.created[0]
    name = job["metadata"]["name"]
    assert k8s.deleted == [name]
    spec = job["spec"]
    assert set(spec) & {"podTemplateOverrides", "runtimePatches"} == {patch_api}
    if patch_api == "podTemplateOverrides":
        pod = spec[patch_api][0]
        assert pod["targetJobs"] == [{"name": "node"}]
    else:
        jobs = spec[patch_api][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod = jobs[0]["template"]["spec"]["template"]
    assert pod["metadata"] == {"labels": {"team": "ml"}, "annotations": {"owner": "alice"}}
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ws-pvc"
    # Secrets by reference only: the compile options' names, no value anywhere in the body.
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in spec["trainer"]["env"]}
    assert env["WANDB_API_KEY"] == {"name": "wandb", "key": "api-key"}
    assert env["HF_TOKEN"] == {"name": "hf-token", "key": "HF_TOKEN", "optional": True}
    assert "t0ken-1234" not in json.dumps(job)
    # The nodes install the pod's wheel, copied onto the workspace, from the configured index.
    command = spec["trainer"]["command"]
    installed = (
        Path(component["pvc_path"]) / "lora-pipeline" / "task-123" / "package" / "lora_pipeline-0.1.0-py3-none-any.whl"
    )
    assert (
        command[:2] == ["sh", "-c"]
        and f"'{installed}[kubeflow]'" in command[2]
        and "--index-url http://index" in command[2]
    )
    assert installed.read_bytes() == b"PK"
    out = capsys.readouterr().out
    assert "[node-0] step 1 loss 2.0" in out and "[node-0] step 2 loss 1.5" in out
    assert f"TrainJob ml/{name} complete" in out and f"TrainJob ml/{name} deleted" in out
    model = Path(component["output_model"].path)
    assert json.loads((model / "adapter" / "adapter_config.json").read_text())["r"] == 8
    assert component["output_metrics"].metrics == {"final_loss": 1.5, "steps": 2}


@pytest.mark.integration
@pytest.mark.parametrize("release", ["v2.1.0", "v2.3.0"])
def test_a_failed_trainjob_ends_the_task_in_one_line_and_is_deleted(
    component: dict[str, Any], release: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    with KubeStandin(release, script=("Created", "Running", "Failed"), token="t0ken-1234") as k8s:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", k8s.url)
        with pytest.raises(SystemExit) as exit_info:
            run_component("train", component, FIXED)
    assert exit_info.value.code == 2
    name = k8s.created[0]["metadata"]["name"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lora-pipeline: error: train.num_workers: TrainJob ml/{name} failed: JobSetFailed: jobset "
                   "failed: node-1 exited with code 1"]  # fmt: skip
    assert k8s.deleted == [name]
    assert not Path(component["output_model"].path).exists()


@pytest.mark.integration
def test_trainer_v2_0_is_refused_in_one_line_before_anything_is_created(
    component: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    with KubeStandin("v2.0.1", token="t0ken-1234") as k8s:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", k8s.url)
        with pytest.raises(SystemExit):
            run_component("train", component, FIXED)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "neither spec.runtimePatches" in err[0] and "upgrade it to v2.1" in err[0]
    assert k8s.created == []


@pytest.mark.parametrize("release, other_api", [("v2.1.0", "runtimePatches"), ("v2.3.0", "podTemplateOverrides")])
def test_the_standin_refuses_the_other_releases_patch(release: str, other_api: str) -> None:
    """The schema check is real: each release's CRD refuses the pod patch of the other (why detection matters)."""
    from lora_pipeline.config import from_dict
    from lora_pipeline.kubeflow.trainjob import TrainJobOptions, build_trainjob, trainjob_body

    job = build_trainjob(from_dict({"train": {"num_workers": 2, "labels": "a=b"}}), TrainJobOptions(image="i", pvc="p"))
    errors = list(validator(release).iter_errors(trainjob_body(job, other_api)))
    assert errors and any(other_api in e.message for e in errors)
    own_api = "podTemplateOverrides" if other_api == "runtimePatches" else "runtimePatches"
    assert not list(validator(release).iter_errors(trainjob_body(job, own_api)))


# --- a remote cluster: KUBERNETES_SERVER_URL + KUBERNETES_AUTH_TOKEN (+ its CA), from the --cluster-secret ----


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    where = tmp_path_factory.mktemp("tls")
    key, crt = where / "tls.key", where / "tls.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    return str(crt), str(key)


@pytest.mark.parametrize(
    "token, with_ca, expected",
    [
        ("t0ken-1234", True, None),  # the CA given, the token right: it runs
        ("wrong-token", True, "401 Unauthorized"),
        ("t0ken-1234", False, "SSLError"),  # a self-signed server without its CA is refused
    ],
)
@pytest.mark.integration
def test_remote_cluster_token_and_ca(
    component: dict[str, Any], cert: tuple[str, str], token: str, with_ca: bool, expected: str | None,
    monkeypatch: pytest.MonkeyPatch, capsys: Any,
) -> None:  # fmt: skip
    monkeypatch.setenv("KUBERNETES_AUTH_TOKEN", token)
    if with_ca:
        monkeypatch.setenv("KUBERNETES_CA_CERT", Path(cert[0]).read_text())
    with KubeStandin("v2.3.0", token="t0ken-1234", tls=cert, on_running=nodes_train) as k8s:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", k8s.url)
        if expected is None:
            run_component("train", component, FIXED)
            assert k8s.deleted == [k8s.created[0]["metadata"]["name"]] and k8s.unauthorized == 0
            return
        with pytest.raises(SystemExit):
            run_component("train", component, FIXED)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and k8s.url in err[0], err
    assert token not in err[0] and k8s.created == []


# --- what compile writes for it ----------------------------------------------------------------------------


@pytest.mark.integration
def test_compiled_pipeline_gives_the_train_task_node_settings_and_the_cluster_secret(tmp_path: Path) -> None:
    from lora_pipeline.cli import main

    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), "--cluster-secret", "remote", "--secret-env", "WANDB_API_KEY=wandb:key",
                 "--hf-token-secret", "hf"]) == 0  # fmt: skip
    text = out.read_text()
    docs = list(yaml.safe_load_all(text))
    executor = docs[0]["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    settings = json.loads(next(e["value"] for e in executor["env"] if e["name"] == SETTINGS_ENV))
    assert ["WANDB_API_KEY", "wandb", "key"] in settings["secret_env"]
    assert ["HF_TOKEN", "hf", "HF_TOKEN"] in settings["optional_secret_env"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train-model"]
    mounted = {(s["secretName"], k["secretKey"], k["envVar"]) for s in platform["secretAsEnv"] for k in s["keyToEnv"]}
    assert {("remote", "KUBERNETES_SERVER_URL", "KUBERNETES_SERVER_URL"), ("remote", "ca.crt", "KUBERNETES_CA_CERT"),
            ("remote", "KUBERNETES_AUTH_TOKEN", "KUBERNETES_AUTH_TOKEN")} <= mounted  # fmt: skip


@pytest.mark.parametrize("flag", ["--cluster-secret", "--hf-token-secret", "--aws-secret", "--registry-token-secret"])
@pytest.mark.parametrize("name", ["Remote", "remote_cluster", "-x", "a" * 254])
def test_a_bad_secret_name_is_one_line(flag: str, name: str, tmp_path: Path, capsys: Any) -> None:
    """Every flag naming a Kubernetes secret: a name the cluster would refuse at run time is refused here."""
    from lora_pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "-o", str(tmp_path / "p.yaml"), f"{flag}={name}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and flag in err and "not a Kubernetes secret name" in err
    assert not (tmp_path / "p.yaml").exists()


def test_rbac_grants_what_the_training_pod_asks() -> None:
    rules: dict[tuple[str, str], set[str]] = {}
    for doc in yaml.safe_load_all((Path(__file__).parents[1] / "deploy" / "trainjob-rbac.yaml").read_text()):
        for rule in doc.get("rules", []):
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    rules.setdefault((group, resource), set()).update(rule["verbs"])
    needed = {("trainer.kubeflow.org", "trainjobs"): {"create", "get", "delete"}, ("", "pods"): {"list"},
              ("", "pods/log"): {"get"}, ("apiextensions.k8s.io", "customresourcedefinitions"): {"get"}}  # fmt: skip
    for key, verbs in needed.items():
        assert verbs <= rules.get(key, set()), key


def test_the_embedded_wheel_travels_to_the_nodes_on_the_workspace(tmp_path, monkeypatch) -> None:
    """`--package-spec embed`: the wheel the train pod installed itself from is what the nodes pip-install."""
    from lora_pipeline.errors import StageError
    from lora_pipeline.kubeflow.trainjob_run import _package_on_workspace
    from lora_pipeline.kubeflow.wheel import WHEEL_ENV

    wheel = tmp_path / "pod" / "lora_pipeline-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"wheel bytes")
    monkeypatch.setenv(WHEEL_ENV, str(wheel))
    spec = _package_on_workspace("embed", tmp_path / "work")
    assert spec == f"{tmp_path / 'work' / 'package' / wheel.name}[kubeflow]"
    assert (tmp_path / "work" / "package" / wheel.name).read_bytes() == b"wheel bytes"
    monkeypatch.delenv(WHEEL_ENV)
    with pytest.raises(StageError, match="embedded wheel was not found"):
        _package_on_workspace("embed", tmp_path / "work2")


# --- the task's kubernetes_config (kfp.dsl.TaskConfig): resources and placement forwarded to every node -------

TASK_CONFIG = {
    "resources": {"requests": {"cpu": "6"}, "limits": {"nvidia.com/gpu": "2"}},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "node_selector": {"pool": "a100"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z1", "z2"]}]}]}}},
}  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize("release, patch_api", [("v2.1.0", "podTemplateOverrides"), ("v2.3.0", "runtimePatches")])
def test_task_config_resources_and_placement_reach_every_node(
    component: dict[str, Any], release: str, patch_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    component["kubernetes_config"] = {**component["kubernetes_config"], **TASK_CONFIG}
    fixed = {**FIXED, "cpu": "3", "memory": "8Gi", "gpus_per_worker": 1}  # the task config wins where it says
    with KubeStandin(release, token="t0ken-1234", on_running=nodes_train) as k8s:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", k8s.url)
        assert run_component("train", component, fixed) == "training completed"
    assert k8s.rejected == [] and len(k8s.created) == 1  # the CRD schema of this release accepts it
    spec = k8s.created[0]["spec"]
    assert spec["trainer"]["resourcesPerNode"] == {
        # each resource the task config names replaces the train options' request and limit of it (cpu: no 3)
        "requests": {"cpu": "6", "memory": "8Gi"},
        "limits": {"memory": "8Gi", "nvidia.com/gpu": "2"},
    }
    if patch_api == "podTemplateOverrides":
        pod = spec[patch_api][0]["spec"]
    else:
        pod = spec[patch_api][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]
        pod = pod["spec"]["template"]["spec"]
    assert pod["tolerations"] == TASK_CONFIG["tolerations"]
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["affinity"] == TASK_CONFIG["affinity"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "ws-pvc"


@pytest.mark.parametrize(
    "field, value",
    [
        ("resources", ["cpu"]),
        ("resources", {"limits": "2"}),
        ("tolerations", {"key": "a"}),
        ("tolerations", ["a"]),
        ("node_selector", "pool=a100"),
        ("affinity", [{"nodeAffinity": {}}]),
    ],
)
@pytest.mark.integration
def test_a_task_config_field_of_the_wrong_shape_is_one_line_before_anything_is_created(
    component: dict[str, Any], field: str, value: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    component["kubernetes_config"] = {**component["kubernetes_config"], field: value}
    with KubeStandin("v2.3.0", token="t0ken-1234") as k8s:
        monkeypatch.setenv("KUBERNETES_SERVER_URL", k8s.url)
        with pytest.raises(SystemExit) as exit_info:
            run_component("train", component, FIXED)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and f"kubernetes_config.{field}" in err[0], err
    assert k8s.created == [] and not (Path(component["pvc_path"]) / "lora-pipeline").exists()
