"""`lora-pipeline compile`: the KFP pipeline and training component match the spec tables; secrets stay
secret names; register runs only with an address; the TrainJob carries the train options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from lora_pipeline.config import from_dict
from test_config import SPEC_DIR, _spec_rows, _spec_value

pytest.importorskip("kfp")

IR_TYPES = {
    "str": "STRING",
    "int": "NUMBER_INTEGER",
    "float": "NUMBER_DOUBLE",
    "bool": "BOOLEAN",
    "list": "LIST",
    "dict": "STRUCT",
    "dsl.TaskConfig": "TASK_CONFIG",
}
needs_spec = pytest.mark.skipif(not SPEC_DIR.exists(), reason="shared/spec is not beside this checkout")


def _load(path: Path) -> tuple[dict, dict]:
    """(pipeline spec, platform spec) of a compiled KFP YAML."""
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("kfp") / "pipeline.yaml"
    # Credentials in the compiling shell must not end up in the YAML.
    result = run_cli("compile", "-o", str(out), env={"HF_TOKEN": "hf_SeKrIt1", "AWS_SECRET_ACCESS_KEY": "aws_SeKrIt2"})
    assert result.returncode == 0, result.stderr
    assert "SeKrIt" not in out.read_text()
    return _load(out)


def _check_parameter(name: str, declared: dict, spec_type: str, spec_default: str) -> None:
    optional_type = spec_type.startswith("Optional[")
    base = spec_type.removeprefix("Optional[").removesuffix("]")
    assert declared["parameterType"] == IR_TYPES[base], name
    expected = _spec_value(spec_default, spec_type)
    if expected is None:  # "None" / "Required": no default in the YAML
        assert "defaultValue" not in declared, name
        assert declared.get("isOptional", False) == (spec_default != "Required"), name
    else:
        assert declared["defaultValue"] == expected, name
        assert type(declared["defaultValue"]) in ((int, float) if base in ("int", "float") else (type(expected),))
    assert not optional_type or "defaultValue" not in declared, name


def _spec_required_lines() -> str:
    return "\n".join(line for line in (SPEC_DIR / "lora_pipeline.md").read_text().splitlines() if "[REQUIRED]" in line)


@pytest.mark.integration
@needs_spec
def test_pipeline_parameters_are_the_spec_table(compiled: tuple[dict, dict]) -> None:
    spec = _spec_rows("lora_pipeline.md")
    # The table's default column says `None` where the description says [REQUIRED]: required wins.
    required = {n for n in spec if f"`{n}`" in _spec_required_lines()}
    assert required == {"phase_01_dataset_man_data_uri"}
    declared = compiled[0]["root"]["inputDefinitions"]["parameters"]
    assert len(spec) == 46
    assert set(declared) == set(spec), set(declared) ^ set(spec)
    for name, (spec_type, spec_default) in spec.items():
        _check_parameter(name, declared[name], spec_type, "Required" if name in required else spec_default)
    assert "artifacts" not in compiled[0]["root"].get("inputDefinitions", {})


@pytest.mark.integration
@needs_spec
def test_training_component_is_the_spec_interface(tmp_path: Path) -> None:
    out = tmp_path / "train_component.yaml"
    result = run_cli("compile", "--component", "train", "-o", str(out))
    assert result.returncode == 0, result.stderr
    spec = _spec_rows("lora_training_component.md")
    component = next(iter(_load(out)[0]["components"].values()))
    inputs, outputs = component["inputDefinitions"], component["outputDefinitions"]
    artifacts = {
        "output_model": ("outputs", "system.Model"),
        "output_metrics": ("outputs", "system.Metrics"),
        "output_loss_chart": ("outputs", "system.HTML"),
        "dataset": ("inputs", "system.Dataset"),
    }
    declared = set(inputs["parameters"]) | set(inputs["artifacts"]) | set(outputs["artifacts"])
    assert declared == set(spec), declared ^ set(spec)
    for name, (spec_type, spec_default) in spec.items():
        if name in artifacts:
            where, schema = artifacts[name]
            entry = (inputs if where == "inputs" else outputs)["artifacts"][name]
            assert entry["artifactType"]["schemaTitle"] == schema, name
            assert entry.get("isOptional", False) == (spec_default == "None"), name
        else:
            _check_parameter(name, inputs["parameters"][name], spec_type, spec_default)
    assert outputs["parameters"] == {"Output": {"parameterType": "STRING"}}  # the spec's status message


@pytest.mark.integration
def test_four_components_wired_from_the_stage_table(compiled: tuple[dict, dict]) -> None:
    pipeline, _ = compiled
    tasks = pipeline["root"]["dag"]["tasks"]
    assert set(tasks) == {"prepare-dataset", "train-model", "evaluate-model", "condition-1"}
    train_in = tasks["train-model"]["inputs"]
    assert train_in["artifacts"]["dataset"]["taskOutputArtifact"] == {
        "outputArtifactKey": "output_dataset",
        "producerTask": "prepare-dataset",
    }
    assert train_in["parameters"]["training_lora_r"] == {"componentInputParameter": "phase_02_train_man_lora_r"}
    assert train_in["parameters"]["pvc_path"]["runtimeValue"]["constant"] == "{{$.workspace_path}}"
    eval_in = tasks["evaluate-model"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
    assert eval_in == {"outputArtifactKey": "output_model", "producerTask": "train-model"}
    outputs = {}
    for name, component in pipeline["components"].items():
        artifacts = component.get("outputDefinitions", {}).get("artifacts", {})
        outputs[name] = {a: v["artifactType"]["schemaTitle"] for a, v in artifacts.items()}
    assert outputs["comp-prepare-dataset"] == {"output_dataset": "system.Dataset"}
    assert outputs["comp-train-model"] == {
        "output_model": "system.Model",
        "output_metrics": "system.Metrics",
        "output_loss_chart": "system.HTML",
    }
    assert outputs["comp-evaluate-model"] == {"output_results": "system.Artifact", "output_metrics": "system.Metrics"}
    for name in ("prepare-dataset", "train-model", "evaluate-model", "register-model"):
        command = json.dumps(pipeline["deploymentSpec"]["executors"][f"exec-{name}"]["container"])
        assert "from lora_pipeline.kubeflow.runtime import run_component" in command


@pytest.mark.integration
def test_register_runs_only_with_an_address(compiled: tuple[dict, dict]) -> None:
    pipeline, _ = compiled
    condition = pipeline["root"]["dag"]["tasks"]["condition-1"]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--phase_04_registry_man_address'] != ''"
    )
    assert set(pipeline["components"]["comp-condition-1"]["dag"]["tasks"]) == {"register-model"}


@pytest.mark.integration
def test_secrets_are_kubernetes_secret_names_never_values(compiled: tuple[dict, dict]) -> None:
    pipeline, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    env = {
        name: {(s["secretName"], k["envVar"]) for s in e.get("secretAsEnv", []) for k in s["keyToEnv"]}
        for name, e in executors.items()
    }
    assert ("hf-token", "HF_TOKEN") in env["exec-train-model"]
    assert ("aws-credentials", "AWS_SECRET_ACCESS_KEY") in env["exec-prepare-dataset"]
    assert ("model-registry-token", "MODEL_REGISTRY_TOKEN") in env["exec-register-model"]
    assert not any("MODEL_REGISTRY_TOKEN" in v for _, v in env["exec-train-model"])
    assert all(s["optional"] for e in executors.values() for s in e.get("secretAsEnv", []))
    parameters = set(pipeline["root"]["inputDefinitions"]["parameters"])
    assert not {p for p in parameters if "secret" in p or "aws" in p or "hf_token" in p}


@pytest.mark.integration
def test_compile_options_image_package_secrets_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"train": {"lora_r": 8, "micro_batch_size": 4}, "eval": {"limit": 5}}))
    out = tmp_path / "p.yaml"
    result = run_cli(
        "compile", "-c", str(config), "-o", str(out), "--image", "registry.example/lora:1", "--package-spec", "",
        "--hf-token-secret", "my-hf", "--aws-secret", "", "--workspace-size", "", "--train.epochs", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    pipeline, platform = _load(out)
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["phase_02_train_man_lora_r"]["defaultValue"] == 8  # -c sets defaults
    assert params["phase_02_train_man_train_epochs"]["defaultValue"] == 3  # and so do flags
    assert params["phase_03_eval_opt_limit"]["defaultValue"] == 5
    train = pipeline["deploymentSpec"]["executors"]["exec-train-model"]["container"]
    assert train["image"] == "registry.example/lora:1"
    assert "pip install" not in json.dumps(train)  # the image has the package
    assert "'micro_batch_size': 4" in json.dumps(train)  # not a parameter: fixed in the component
    secrets = json.dumps(platform)
    assert "my-hf" in secrets and "aws-credentials" not in secrets
    pvc_path = pipeline["root"]["dag"]["tasks"]["train-model"]["inputs"]["parameters"]["pvc_path"]
    assert pvc_path["runtimeValue"]["constant"] == ""  # --workspace-size '': no workspace
    assert "workspace" not in json.dumps(platform)


@pytest.mark.integration
def test_default_compile_names_no_package_an_index_lacks(compiled: tuple[dict, dict]) -> None:
    container = compiled[0]["deploymentSpec"]["executors"]["exec-prepare-dataset"]["container"]
    assert "lora-pipeline[kubeflow]==" not in json.dumps(container)  # the wheel is embedded instead
    assert container["image"].startswith("pytorch/pytorch:")


@pytest.mark.integration
def test_help_loads_no_kfp() -> None:
    code = (
        "import sys; from lora_pipeline import cli; cli.build_parser().format_help(); "
        "print(sorted({'kfp', 'kubeflow', 'kubernetes'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- multi-node TrainJob ---------------------------------------------------------------------------------


def test_trainjob_from_the_train_options() -> None:
    from kubeflow_trainer_api import models

    from lora_pipeline.kubeflow.trainjob import TrainJobOptions, build_trainjob

    config = from_dict(
        {
            "train": {
                "num_workers": 3,
                "num_procs": "2",
                "gpus_per_worker": 2,
                "cpu": "8",
                "memory": "64Gi",
                "labels": "team=ml,tier=gpu",
                "annotations": "owner=alice",
                "env_vars": "NCCL_DEBUG=INFO",
                "lora_r": 8,
                "lora_load_in_4bit": False,
            }
        }
    )
    options = TrainJobOptions(image="registry.example/lora:1", name="lora-x", namespace="ml", pvc="data")
    job = build_trainjob(config, options)
    assert isinstance(job, models.TrainerV1alpha1TrainJob)
    assert (job.api_version, job.kind) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert (job.metadata.name, job.metadata.namespace) == ("lora-x", "ml")
    assert job.metadata.labels == {"team": "ml", "tier": "gpu"}
    assert job.metadata.annotations == {"owner": "alice"}
    assert job.spec.runtime_ref.name == "torch-distributed"
    trainer = job.spec.trainer
    assert isinstance(trainer, models.TrainerV1alpha1Trainer)
    assert (trainer.num_nodes, trainer.num_proc_per_node, trainer.image) == (3, 2, "registry.example/lora:1")
    limits = {k: v.actual_instance for k, v in trainer.resources_per_node.limits.items()}
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    assert trainer.resources_per_node.requests == trainer.resources_per_node.limits
    assert [(e.name, e.value) for e in trainer.env] == [("NCCL_DEBUG", "INFO")]
    assert trainer.command[:4] == ["torchrun", "--no-python", "lora-pipeline", "train"]
    assert trainer.command[4:8] == ["--input", "dataset=/workspace/dataset", "--out", "/workspace/train"]
    assert set(trainer.command[8:]) == {"--train.lora_r=8", "--train.lora_load_in_4bit=false"}
    pod = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec
    assert pod.volumes[0].persistent_volume_claim.claim_name == "data"
    assert pod.containers[0].volume_mounts[0].mount_path == "/workspace"
    # Round trip through the API model: what would be submitted parses back to the same object.
    assert models.TrainerV1alpha1TrainJob.from_dict(job.to_dict()).to_dict() == job.to_dict()


def test_trainjob_auto_procs_and_no_gpu_leave_the_runtime_defaults() -> None:
    from lora_pipeline.kubeflow.trainjob import TrainJobOptions, build_trainjob

    job = build_trainjob(from_dict({"train": {"gpus_per_worker": 0}}), TrainJobOptions(image="img"))
    assert job.spec.trainer.num_proc_per_node is None  # `auto`: the torch runtime's one per GPU
    assert "nvidia.com/gpu" not in job.spec.trainer.resources_per_node.limits
    assert job.spec.runtime_patches is None and job.metadata.labels is None
    assert job.metadata.name.startswith("lora-")


@pytest.mark.integration
def test_trainjob_dry_run_prints_yaml_and_submits_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_cli(
        "compile", "--trainjob", "--dry-run", "--name", "demo", "--train.num_workers", "2",
        env={"KUBERNETES_SERVER_URL": "https://127.0.0.1:9"},  # unreachable: a submission attempt would fail
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert job["kind"] == "TrainJob" and job["metadata"]["name"] == "demo"
    assert job["spec"]["trainer"]["numNodes"] == 2


def test_remote_cluster_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_pipeline.kubeflow.trainjob import client_configuration

    monkeypatch.delenv("KUBERNETES_SERVER_URL", raising=False)
    assert client_configuration() is None
    monkeypatch.setenv("KUBERNETES_SERVER_URL", "https://k8s.example:6443")
    monkeypatch.setenv("KUBERNETES_AUTH_TOKEN", "t0ken")
    configuration = client_configuration()
    assert configuration.host == "https://k8s.example:6443"
    assert configuration.get_api_key_with_prefix("authorization") == "Bearer t0ken"
