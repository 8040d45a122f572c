"""The compiled IR is valid for Kubeflow Pipelines 2.15.2, the oldest backend the spec allows.

The test data are the protobuf schemas the 2.15.2 backend reads the YAML with, as serialized
FileDescriptorProtos taken unchanged from PyPI's kfp-pipeline-spec==2.15.2 (kfp/pipeline_spec/pipeline_spec_pb2.py)
and kfp-kubernetes==2.15.2 (kfp/kubernetes/kubernetes_executor_config_pb2.py). The compiled pipeline, its
platform spec and every executor's Kubernetes config are parsed strictly against them: a field or enum value
that 2.15.2 does not know (one a newer SDK writes) fails here, as the backend would drop or refuse it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lora_pipeline.cli import main

pytest.importorskip("kfp")

SCHEMAS = Path(__file__).parent / "data" / "kfp-2.15.2"


def _messages() -> dict[str, type]:
    from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory, struct_pb2
    from google.rpc import status_pb2

    pool = descriptor_pool.DescriptorPool()
    for module in (any_pb2, duration_pb2, struct_pb2, status_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    for name in ("pipeline_spec.desc", "kubernetes_executor_config.desc"):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString((SCHEMAS / name).read_bytes()))
    names = ("ml_pipelines.PipelineSpec", "ml_pipelines.PlatformSpec", "kfp_kubernetes.KubernetesExecutorConfig")
    return {n.split(".")[1]: message_factory.GetMessageClass(pool.FindMessageTypeByName(n)) for n in names}


@pytest.mark.parametrize(
    "args",
    [
        [],
        [
            "--package-spec",
            "",
            "--image",
            "r.example/lora:1",
            "--workspace-storage-class",
            "nfs",
            "--workspace-access-mode",
            "ReadWriteMany",
            "--kfp-cache",
            "--secret-env",
            "WANDB_API_KEY=wandb:key",
        ],
    ],  # fmt: skip
    ids=["defaults", "options"],
)
@pytest.mark.integration
def test_compiled_yaml_parses_strictly_with_the_kfp_2_15_2_schemas(tmp_path: Path, args: list[str]) -> None:
    from google.protobuf import json_format

    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), *args]) == 0
    pipeline, platform = yaml.safe_load_all(out.read_text())
    messages = _messages()
    json_format.ParseDict(pipeline, messages["PipelineSpec"](), ignore_unknown_fields=False)
    json_format.ParseDict(platform, messages["PlatformSpec"](), ignore_unknown_fields=False)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors
    for config in executors.values():
        json_format.ParseDict(config, messages["KubernetesExecutorConfig"](), ignore_unknown_fields=False)


def test_the_schemas_are_2_15_2s_and_catch_a_newer_field() -> None:
    from google.protobuf import json_format

    messages = _messages()
    with pytest.raises(json_format.ParseError):
        json_format.ParseDict({"noSuchField": 1}, messages["PipelineSpec"](), ignore_unknown_fields=False)
    fields = {f.name for f in messages["PipelineSpec"].DESCRIPTOR.fields}
    assert {"pipeline_info", "deployment_spec", "root", "components"} <= fields
