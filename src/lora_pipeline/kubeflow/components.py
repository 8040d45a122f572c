"""The KFP components, one per row of the stage table (its `kfp` declaration), generated from the config.

A KFP lightweight component is a Python function whose *source* KFP ships to the pod, and whose signature
is its interface. The signature here is generated from the config (parameters.py), so each component's
source is written out below, registered in `linecache` (where `inspect.getsource`, and so KFP, finds it)
and compiled. The body is always the same one line: `run_component(stage, dict(locals()), fixed)` (runtime.py),
which runs the stage's CLI command. kfp is imported only when a component is built (`lora-pipeline compile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.config import Config
from lora_pipeline.kubeflow.parameters import RUN_INPUTS, component_parameters, fixed_values
from lora_pipeline.kubeflow.secret_values import secret_name
from lora_pipeline.kubeflow.wheel import embedded_wheel, install_lora_pipeline, pip_options

# Python 3.11 with CUDA torch already installed, so `pip install lora-pipeline` adds only the pure-Python rest.
DEFAULT_IMAGE = "pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime"
# `--package-spec` default: embed this project's wheel; each pod installs it and its dependencies (wheel.py).
EMBED = "embed"
DEFAULT_PACKAGE_SPEC = EMBED

# Task config a component with `task_config` (training) forwards (kubernetes_config) to a multi-node TrainJob,
# and applies to its own pod too: resources, env, volumes, tolerations, node selector, affinity set on the task.
_PASSTHROUGHS = ("RESOURCES", "ENV", "KUBERNETES_VOLUMES", "KUBERNETES_TOLERATIONS", "KUBERNETES_NODE_SELECTOR",
                 "KUBERNETES_AFFINITY")  # fmt: skip


ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")


def _flag(default: Any, help: str, **argparse_settings: Any) -> Any:
    """A BuildOptions field that is also a `compile` flag (--field-name): its help and argparse settings ride
    along in the field's metadata, and command.py declares the flag from them."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_settings})


@dataclass(frozen=True)
class BuildOptions:
    """The options of `lora-pipeline compile` that are not pipeline parameters; a field with a help is a flag."""

    image: str = _flag(DEFAULT_IMAGE, "Container image of every step (default: %(default)s)")
    package_spec: str = _flag(
        DEFAULT_PACKAGE_SPEC,
        f"What each step pip-installs: '{EMBED}' = this project's wheel, embedded in the YAML, and its "
        "dependencies from the index; or a requirement, wheel URL or git URL; '' if the image "
        "has lora-pipeline[kubeflow] already (default: %(default)s)",
        metavar="SPEC",
    )
    wheel: str = _flag(
        "", f"With --package-spec {EMBED}: embed this lora_pipeline-*.whl (default: build one from the checkout)",
        metavar="PATH",
    )  # fmt: skip
    pip_index_urls: tuple[str, ...] = _flag(
        (), "Index (mirror) each step installs its packages from (repeatable; default: pip's own)",
        flag="--pip-index-url", metavar="URL",
    )  # fmt: skip
    pip_trusted_hosts: tuple[str, ...] = _flag(
        (), "Host pip trusts without HTTPS (repeatable; default: each --pip-index-url)",
        flag="--pip-trusted-host", metavar="HOST",
    )  # fmt: skip
    kfp_cache: bool = _flag(
        False, "Let KFP cache the tasks (off by default: the same URI or model id may hold new content)"
    )
    # Kubernetes secrets mounted as env vars (optional: a missing secret or key leaves the variable unset);
    # "" = none. The keys are the variable names (see pipeline.SECRET_ENV).
    hf_token_secret: str = _flag(
        "hf-token", "Kubernetes secret with key HF_TOKEN ('' = none; default: %(default)s)", metavar="NAME",
        type=secret_name,
    )  # fmt: skip
    aws_secret: str = _flag(
        "aws-credentials",
        "Kubernetes secret with keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[, AWS_SESSION_TOKEN, "
        "AWS_DEFAULT_REGION, AWS_ENDPOINT_URL] ('' = none; default: %(default)s)",
        metavar="NAME", type=secret_name,
    )  # fmt: skip
    registry_token_secret: str = _flag(
        "model-registry-token", "Kubernetes secret with key MODEL_REGISTRY_TOKEN ('' = none; default: %(default)s)",
        metavar="NAME", type=secret_name,
    )  # fmt: skip
    # The pipeline workspace (a PVC per run) given to the training component as `pvc_path`; multi-node
    # training shares the dataset and output with the TrainJob's pods through it. "" = no workspace.
    workspace_size: str = _flag(
        "20Gi", "Pipeline workspace PVC size, shared with multi-node training ('' = none; default: %(default)s)",
        metavar="SIZE",
    )  # fmt: skip
    workspace_storage_class: str = _flag(
        "", "Workspace PVC storage class (default: the cluster's default StorageClass)", metavar="NAME"
    )
    workspace_access_mode: str = _flag(
        "ReadWriteOnce", "Workspace PVC access mode; multi-node training needs ReadWriteMany (default: %(default)s)",
        choices=ACCESS_MODES,
    )  # fmt: skip
    cluster_secret: str = _flag(
        "",
        "Kubernetes secret with keys KUBERNETES_SERVER_URL, KUBERNETES_AUTH_TOKEN[, ca.crt, KUBERNETES_NAMESPACE]: "
        "the cluster a multi-node train submits its TrainJob to ('' = the train pod's service account, see "
        "deploy/trainjob-rbac.yaml)",
        metavar="NAME", type=secret_name,
    )  # fmt: skip
    # --secret-env, parsed: (env var, secret name, key) mounted in the train task's pod (required, not optional).
    secret_env: tuple[tuple[str, str, str], ...] = ()
    embedded: str = ""  # EMBED: the packed wheel (.whl.xz) once prepared (`embedding`)


@contextlib.contextmanager
def embedding(options: BuildOptions) -> Iterator[BuildOptions]:
    """The options with the packed wheel prepared (once for all components), while the components are built."""
    if options.package_spec != EMBED or options.embedded:
        yield options
        return
    with tempfile.TemporaryDirectory(prefix="lora-pipeline-embed-") as tmp:
        yield dataclasses.replace(options, embedded=str(embedded_wheel(Path(tmp), options.wheel)))


def component_source(stage: str, config: Config | None = None, install: list[str] | None = None) -> str:
    """The Python source of a stage's component function: its KFP interface and the one-line body.

    `install`: pip options; the body first installs the embedded wheel with them (`install_lora_pipeline`).
    """
    config = config or Config()
    kfp = table.BY_NAME[stage].kfp
    params = ["pvc_path: str"] if kfp.workspace else []  # the spec's first input: the pipeline workspace
    outputs = [kfp.output]
    outputs += [(kfp.metrics[0], "Metrics")] if kfp.metrics else []
    outputs += [(kfp.chart[0], "HTML")] if kfp.chart else []
    params += [f"{name}: Output[{cls}]" for name, cls in outputs]
    for up, name in kfp.inputs.items():
        # The spec's training component takes `dataset: Input[Dataset] = None` (the workspace may hold it).
        params.append(f"{name}: Input[{table.BY_NAME[up].kfp.output[1]}]" + (" = None" if kfp.workspace else ""))
    params += [f"{p.name}: {p.annotation} = {p.default!r}" for p in component_parameters(stage, config)]
    if kfp.task_config:
        params.append("kubernetes_config: TaskConfig = None")
    if kfp.run_inputs:  # the pipeline run, from KFP's placeholders: recorded on the version (provenance)
        params += [f"{name}: str = ''" for name in RUN_INPUTS]
    signature = ",\n    ".join(params)
    return (
        f"def {kfp.component}(\n    {signature},\n){' -> str' if kfp.returns else ''}:\n"
        f'    """{table.BY_NAME[stage].help}."""\n'
        + (f"    install_lora_pipeline({install!r})\n" if install is not None else "")
        + "    from lora_pipeline.kubeflow.runtime import run_component\n\n"
        f"    return run_component({stage!r}, dict(locals()), {fixed_values(stage, config)!r})\n"
    )


def build_component(stage: str, config: Config | None = None, options: BuildOptions | None = None) -> Any:
    """A KFP component (a `PythonComponent`) for one stage."""
    with embedding(options or BuildOptions()) as prepared:
        return _build_component(stage, config, prepared)


def _build_component(stage: str, config: Config | None, options: BuildOptions) -> Any:
    from kfp import dsl

    embed = options.package_spec == EMBED
    install = pip_options(options.pip_index_urls, options.pip_trusted_hosts) if embed else None
    kfp = table.BY_NAME[stage].kfp
    function = _define(kfp.component, component_source(stage, config, install))
    passthroughs = None
    if kfp.task_config:
        passthroughs = [
            dsl.TaskConfigPassthrough(field=getattr(dsl.TaskConfigField, name), apply_to_task=True)
            for name in _PASSTHROUGHS
        ]
    component = dsl.component(
        function,
        base_image=options.image,
        packages_to_install=[options.package_spec] if options.package_spec and not embed else None,
        pip_index_urls=list(options.pip_index_urls) or None,
        pip_trusted_hosts=list(options.pip_trusted_hosts) or None,
        # with the package baked into the image, kfp comes with it (the `kubeflow` extra): no pip at start
        install_kfp_package=bool(options.package_spec),
        task_config_passthroughs=passthroughs,
        additional_funcs=[install_lora_pipeline] if embed else None,
        embedded_artifact_path=options.embedded or None,
    )
    _split_source(component.component_spec.implementation.container)
    return component


# Linux refuses to exec an argument longer than 128 KiB (MAX_ARG_STRLEN, E2BIG), and KFP passes a component's
# whole source, embedded wheel included, as one argument of `sh -ec PROGRAM SOURCE`. Longer sources go as
# several arguments that the program concatenates back (the whole command line may hold megabytes).
MAX_ARGUMENT = 96 * 1024
_WRITE_SOURCE = 'printf "%s" "$0" > "$program_path/ephemeral_component.py"'


def _split_source(container: Any) -> None:
    """Rewrite the container command in place so that no argument exceeds MAX_ARGUMENT bytes."""
    command, source = container.command[:-1], container.command[-1]
    if len(source.encode()) <= MAX_ARGUMENT:
        return
    if _WRITE_SOURCE not in command[-1]:  # a KFP release that writes its program differently
        raise RuntimeError("kfp's component command changed: cannot split the embedded wheel's source")
    step = MAX_ARGUMENT if source.isascii() else MAX_ARGUMENT // 4  # UTF-8: at most 4 bytes a character
    parts = [source[i : i + step] for i in range(0, len(source), step)]
    positional = " ".join(f'"${i}"' if i < 10 else f'"${{{i}}}"' for i in range(len(parts)))
    program = command[-1].replace(
        _WRITE_SOURCE, f'printf "%s" {positional} > "$program_path/ephemeral_component.py"\nshift {len(parts) - 1}'
    )
    container.command = [*command[:-1], program, *parts]


def _define(name: str, source: str) -> Any:
    """Compile generated source into a function that `inspect.getsource` can read back (as KFP does)."""
    from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output, TaskConfig

    filename = f"<lora_pipeline.kubeflow component {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {
        "__name__": f"lora_pipeline.kubeflow.generated_{name}",
        **{t.__name__: t for t in (HTML, Artifact, Dataset, Metrics, Model, TaskConfig)},
        "Input": Input,
        "Output": Output,
        "Optional": __import__("typing").Optional,
    }
    # dont_inherit: this module's `from __future__ import annotations` would turn the annotations into strings
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace[name]
