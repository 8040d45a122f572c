"""The KFP pipeline: the stage table's components wired in order, its parameters from the config.

`build_pipeline()` returns a KFP pipeline whose parameters are the config's `kfp` names (the spec's 46),
with the config's defaults; `compile_pipeline()` writes it as KFP v2 IR YAML. Secrets never become
parameters: they reach the pods as env vars from Kubernetes secrets (kfp-kubernetes), by secret name only.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.config import Config
from lora_pipeline.files import atomic_file
from lora_pipeline.kubeflow.components import BuildOptions, build_component, embedding
from lora_pipeline.kubeflow.parameters import RUN_INPUTS, component_parameters, pipeline_parameters
from lora_pipeline.stages import Stage, resolve

PIPELINE_NAME = "lora-pipeline"
DESCRIPTION = "LoRA fine-tuning: dataset -> train -> eval -> register (register only with a registry address)"

# BuildOptions attribute -> {secret key: env var}: optional secrets; a stage's `kfp.secrets` names the ones its
# pod gets, and "secret_env" for the required --secret-env ones.
SECRET_ENV: dict[str, dict[str, str]] = {
    "hf_token_secret": {"HF_TOKEN": "HF_TOKEN"},
    "aws_secret": {
        k: k
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
        )
    },
    "registry_token_secret": {"MODEL_REGISTRY_TOKEN": "MODEL_REGISTRY_TOKEN"},
}
# The spec marks it [REQUIRED]: no default in the IR unless `compile -c` sets one.
REQUIRED = ("dataset", "data_uri")


def build_pipeline(config: Config | None = None, options: BuildOptions | None = None) -> Any:
    """The KFP pipeline (a GraphComponent). `config` sets the parameters' defaults (the spec's without it)."""
    from kfp import dsl

    config = config or Config()
    params = pipeline_parameters(config)
    with embedding(options or BuildOptions()) as options:  # one wheel, packed once, for all the components
        components = {stage.name: build_component(stage.name, config, options) for stage in table.STAGES}

    def lora_pipeline(*args: Any) -> None:
        # KFP calls the pipeline function with one channel per parameter, in signature order.
        by_field = {(p.section, p.field): channel for p, channel in zip(params, args, strict=True)}
        tasks: dict[str, Any] = {}
        for stage in table.STAGES:
            arguments = _task_arguments(stage, by_field, tasks, options)
            if stage.kfp.only_if:
                section, name = stage.kfp.only_if
                with dsl.If(by_field[section, name] != "", name=f"{section}-{name}-set"):
                    tasks[stage.name] = components[stage.name](**arguments)
            else:
                tasks[stage.name] = components[stage.name](**arguments)
            task = tasks[stage.name].set_display_name(stage.name)
            # KFP's cache key is the parameter values: a data URI or a hub model id can change content
            # under the same string, so a cached task would serve a stale dataset, model or score.
            task.set_caching_options(options.kfp_cache)
            if stage.kfp.configure:
                resolve(stage.kfp.configure)(task, options)
            if stage.kfp.resources:
                _set_resources(task, by_field)
            _mount_secrets(task, stage, options)

    lora_pipeline.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_default(p), annotation=p.type)
            for p in params
        ]
    )
    return dsl.pipeline(
        lora_pipeline,
        name=PIPELINE_NAME,
        description=DESCRIPTION,
        pipeline_config=dsl.PipelineConfig(workspace=_workspace(options)),
    )


def _task_arguments(
    stage: Stage, by_field: dict[tuple[str, str], Any], tasks: dict[str, Any], options: BuildOptions
) -> dict[str, Any]:
    """A stage's task arguments: its parameters' channels, its upstream tasks' outputs, the workspace path and
    the pipeline run's placeholders where the component takes them."""
    from kfp import dsl

    arguments = {
        p.name: by_field[p.section, p.field]
        for p in component_parameters(stage.name)
        if (p.section, p.field) in by_field
    }
    for up, name in stage.kfp.inputs.items():
        arguments[name] = tasks[up].outputs[table.BY_NAME[up].kfp.output[0]]
    if stage.kfp.workspace:
        arguments["pvc_path"] = dsl.WORKSPACE_PATH_PLACEHOLDER if options.workspace_size else ""
    if stage.kfp.run_inputs:
        placeholders = (dsl.PIPELINE_JOB_ID_PLACEHOLDER, dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        arguments.update(zip(RUN_INPUTS, placeholders, strict=True))
    return arguments


def _default(p: Any) -> Any:
    required = (p.section, p.field) == REQUIRED and p.default in (None, "")
    return inspect.Parameter.empty if required else p.default


def _workspace(options: BuildOptions) -> Any:
    """The workspace PVC: size and access mode always written, the storage class when given (else the
    cluster's default StorageClass), so no KFP-backend default decides them."""
    from kfp import dsl

    if not options.workspace_size:
        return None
    patch: dict[str, Any] = {"accessModes": [options.workspace_access_mode]}
    if options.workspace_storage_class:
        patch["storageClassName"] = options.workspace_storage_class
    return dsl.WorkspaceConfig(size=options.workspace_size, kubernetes=dsl.KubernetesWorkspaceConfig(patch))


def _set_resources(task: Any, by_field: dict[tuple[str, str], Any]) -> None:
    """CPU, memory and GPUs of the task's pod from the train options (pipeline parameters, set per run)."""
    cpu, memory, gpus = (by_field["train", name] for name in ("cpu", "memory", "gpus_per_worker"))
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)


def _mount_secrets(task: Any, stage: Stage, options: BuildOptions) -> None:
    from kfp import kubernetes

    for attribute, keys in SECRET_ENV.items():
        secret = getattr(options, attribute)
        if secret and attribute in stage.kfp.secrets:
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env=keys, optional=True)
    if "secret_env" in stage.kfp.secrets:  # --secret-env: what train.env_vars may not carry as a value (required)
        for env, secret, key in options.secret_env:
            kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={key: env})


def train_secret_refs(options: BuildOptions) -> tuple[tuple[str, str, str], ...]:
    """(env var, secret, key) of the optional secrets the train pod mounts (HF, AWS): a TrainJob's nodes get them."""
    mounted = table.BY_NAME["train"].kfp.secrets
    return tuple((env, getattr(options, attr), key) for attr, keys in SECRET_ENV.items()
                 if getattr(options, attr) and attr in mounted for key, env in keys.items())  # fmt: skip


def train_task_settings(task: Any, options: BuildOptions) -> None:
    """The train task's own settings: the image and install a multi-node TrainJob's nodes run, their secrets
    by name, and the cluster to submit it to."""
    from kfp import kubernetes

    from lora_pipeline.kubeflow.trainjob_run import SETTINGS_ENV, settings_env

    task.set_env_variable("LORA_PIPELINE_IMAGE", options.image)  # the image a TrainJob runs (train_on_cluster)
    value = settings_env(options.image, options.package_spec, options.pip_index_urls, options.secret_env,
                         train_secret_refs(options))  # fmt: skip
    task.set_env_variable(SETTINGS_ENV, value)
    if options.cluster_secret:  # a remote cluster: its address and token required, its CA and namespace optional
        keys = {"KUBERNETES_SERVER_URL": "KUBERNETES_SERVER_URL", "KUBERNETES_AUTH_TOKEN": "KUBERNETES_AUTH_TOKEN"}
        kubernetes.use_secret_as_env(task, secret_name=options.cluster_secret, secret_key_to_env=keys)
        kubernetes.use_secret_as_env(task, secret_name=options.cluster_secret, optional=True,
                                     secret_key_to_env={"ca.crt": "KUBERNETES_CA_CERT",
                                                        "KUBERNETES_NAMESPACE": "KUBERNETES_NAMESPACE"})  # fmt: skip


def compile_pipeline(path: Path, config: Config | None = None, options: BuildOptions | None = None) -> Path:
    """Write the pipeline as KFP v2 IR YAML."""
    from kfp import compiler

    with atomic_file(path) as tmp:  # a killed compile leaves the previous file, not a truncated one
        compiler.Compiler().compile(build_pipeline(config, options), str(tmp))
    return Path(path)


def compile_component(
    stage: str, path: Path, config: Config | None = None, options: BuildOptions | None = None
) -> Path:
    """Write one stage's component alone as KFP v2 IR YAML (e.g. the training component of the spec)."""
    from kfp import compiler

    with atomic_file(path) as tmp:
        compiler.Compiler().compile(build_component(stage, config, options), str(tmp))
    return Path(path)
