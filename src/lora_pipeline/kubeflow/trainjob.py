"""Multi-node training as a Kubeflow Trainer TrainJob (torch-distributed runtime), built from the config.

Nodes = `train.num_workers`; processes per node = `train.num_procs` (`auto`: the runtime's default, one
per GPU); resources per node from `train.cpu`, `train.memory`, `train.gpus_per_worker` (the task config's
`resources` win where they name a resource; its tolerations, node selector, affinity in the pod patch);
`train.labels` and `train.annotations` on the TrainJob and on every node's pod; `train.env_vars` in every
node's env, secrets as `secretKeyRef` env (never values). With a package spec each node first pip-installs it,
as the pipeline's pods do. Each node runs
`torchrun --no-python lora-pipeline train --input dataset=DIR --out DIR --train.OPTION VALUE ...`; torchrun
reads its node count, rank and rendezvous from the PET_* variables the runtime sets. The dataset and output
directories must be on storage all nodes share (a PVC, `TrainJobOptions.pvc`).

`build_trainjob()` is pure (a `kubeflow_trainer_api` model, printed by `lora-pipeline compile --trainjob`).
`submit()` hands that same object to the cluster through the `kubeflow` SDK's TrainerClient. How a TrainJob
patches its pods changed across Trainer releases: `runtimePatches` (v2.2+, the model's own field) or
`podTemplateOverrides` (v2.1); `trainjob_body()` writes the one named in `TrainJobOptions.patch_api`.
The pipeline's training component runs the whole job (submit, logs, wait, delete): trainjob_run.py.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import string
from dataclasses import dataclass
from typing import Any

from lora_pipeline.config import Config, coerce, fields_of

MANAGER = "lora-pipeline"  # the runtimePatches entry this package owns
RUNTIME_PATCHES, POD_TEMPLATE_OVERRIDES = "runtimePatches", "podTemplateOverrides"  # Trainer v2.2+, v2.1
SUBMIT_TIMEOUT_S = 60.0  # compile --trainjob --submit --timeout: connecting and creating, in all
# Train options the TrainJob itself expresses (nodes, processes, resources, metadata, env): not passed as flags.
PLACEMENT = ("num_workers", "num_procs", "gpus_per_worker", "cpu", "memory", "labels", "annotations", "env_vars")


@dataclass(frozen=True)
class TrainJobOptions:
    image: str
    name: str = ""  # "" = "lora-" + random suffix
    namespace: str | None = None  # submit(): None = the client's current namespace
    runtime: str = "torch-distributed"
    pvc: str = ""  # PersistentVolumeClaim mounted on every node at mount_path ("" = none)
    mount_path: str = "/workspace"
    dataset_dir: str = "/workspace/dataset"  # a dataset stage output (train.jsonl, eval.jsonl)
    output_dir: str = "/workspace/train"
    secret_env: tuple[tuple[str, str, str], ...] = ()  # --secret-env: (env var, secret name, key)
    optional_secret_env: tuple[tuple[str, str, str], ...] = ()  # HF / AWS secrets: unset when absent, as on the pods
    package_spec: str = ""  # what each node pip-installs before training ("" = the image has it)
    pip_index_urls: tuple[str, ...] = ()
    patch_api: str = RUNTIME_PATCHES  # how the job patches its pods (volume, labels): the cluster's CRD decides
    # The pipeline task's kubernetes_config (kfp.dsl.TaskConfig), fragments of a pod spec in Kubernetes JSON.
    resources: dict[str, Any] | None = None  # ResourceRequirements per node: {"requests": {...}, "limits": {...}}
    tolerations: tuple[dict[str, Any], ...] = ()
    node_selector: dict[str, str] | None = None
    affinity: dict[str, Any] | None = None


def train_command(config: Config, dataset_dir: str, output_dir: str) -> list[str]:
    """What every process runs: the train stage's CLI command with the options that differ from the defaults."""
    argv = ["torchrun", "--no-python", "lora-pipeline", "train", "--input", f"dataset={dataset_dir}"]
    argv += ["--out", output_dir]
    default = Config().train
    for f in fields_of("train"):
        value = getattr(config.train, f.name)
        if f.name not in PLACEMENT and value != getattr(default, f.name):
            argv.append(f"--train.{f.name}={_flag_value(value)}")
    return argv


def _flag_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()  # true / false / none
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def build_trainjob(config: Config, options: TrainJobOptions) -> Any:
    """The TrainJob for `config.train`, as a `kubeflow_trainer_api` TrainerV1alpha1TrainJob."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.backends.kubernetes.utils import get_trainer_cr_from_custom_trainer
    from kubeflow.trainer.constants import constants
    from kubeflow_trainer_api import models

    train = config.train
    resources: dict[str, Any] = {"cpu": train.cpu, "memory": train.memory}
    if train.gpus_per_worker:
        resources["gpu"] = str(train.gpus_per_worker)  # a quantity string, as cpu and memory
    env = _key_values(train.env_vars, "train.env_vars")
    trainer = CustomTrainerContainer(
        image=options.image, num_nodes=train.num_workers, resources_per_node=resources, env=env or None
    )
    # The SDK's own translation (resources, GPU alias, env); the runtime argument is unused for containers.
    trainer_cr = get_trainer_cr_from_custom_trainer(None, trainer)  # type: ignore[arg-type]
    if options.resources:
        trainer_cr.resources_per_node = _merged_resources(trainer_cr.resources_per_node, options.resources)
    trainer_cr.command = node_command(train_command(config, options.dataset_dir, options.output_dir), options)
    refs = [(ref, False) for ref in options.secret_env] + [(ref, True) for ref in options.optional_secret_env]
    if refs:
        trainer_cr.env = (trainer_cr.env or []) + [_secret_env(*ref, optional=optional) for ref, optional in refs]
    if train.num_procs != "auto":
        trainer_cr.num_proc_per_node = int(train.num_procs)
    name = options.name or "lora-" + "".join(random.choices(string.ascii_lowercase + string.digits, k=8))
    labels = _key_values(train.labels, "train.labels")
    annotations = _key_values(train.annotations, "train.annotations")
    placed = options.pvc or options.tolerations or options.node_selector or options.affinity
    patch = _pod_patch(options, labels, annotations) if placed or labels or annotations else None
    return models.TrainerV1alpha1TrainJob(
        apiVersion=constants.API_VERSION,
        kind=constants.TRAINJOB_KIND,
        metadata=models.IoK8sApimachineryPkgApisMetaV1ObjectMeta(
            name=name,
            namespace=options.namespace,
            labels=labels or None,
            annotations=annotations or None,
        ),
        spec=models.TrainerV1alpha1TrainJobSpec(
            runtimeRef=models.TrainerV1alpha1RuntimeRef(name=options.runtime),
            trainer=trainer_cr,
            runtimePatches=[patch] if patch else None,
        ),
    )


def _merged_resources(own: Any, task: dict[str, Any]) -> Any:
    """The task config wins over train.cpu / train.memory / train.gpus_per_worker: each resource it names (in
    requests or limits) replaces the train options' request *and* limit of that resource, so that a request
    from one and a limit from the other never contradict each other."""
    from kubeflow_trainer_api import models

    base = own.to_dict() if own is not None else {}
    named = {name for part in ("requests", "limits") for name in task.get(part) or {}}
    merged: dict[str, dict[str, str]] = {}
    for part in ("requests", "limits"):
        values = {name: str(q) for name, q in (base.get(part) or {}).items() if name not in named}
        values.update({str(name): str(q) for name, q in (task.get(part) or {}).items()})
        if values:
            merged[part] = values
    return models.IoK8sApiCoreV1ResourceRequirements.from_dict(merged)


def _key_values(text: str, field: str) -> dict[str, str]:
    return {str(k): str(v) for k, v in coerce(text, dict, field).items()} if text.strip() else {}


def node_command(train_argv: list[str], options: TrainJobOptions) -> list[str]:
    """The node's command: the train command, after a pip install of the package spec when there is one."""
    if not options.package_spec:
        return train_argv
    pip = ["python", "-m", "pip", "install", "--no-cache-dir"]
    for url in options.pip_index_urls:
        pip += ["--index-url" if url == options.pip_index_urls[0] else "--extra-index-url", url]
    return ["sh", "-c", f"{shlex.join([*pip, options.package_spec])} && exec {shlex.join(train_argv)}"]


def _secret_env(env: str, secret: str, key: str, optional: bool) -> Any:
    from kubeflow_trainer_api import models

    selector = models.IoK8sApiCoreV1SecretKeySelector(name=secret, key=key, optional=optional or None)
    return models.IoK8sApiCoreV1EnvVar(name=env, valueFrom=models.IoK8sApiCoreV1EnvVarSource(secretKeyRef=selector))


def _pod_patch(options: TrainJobOptions, labels: dict[str, str], annotations: dict[str, str]) -> Any:
    """Every node's pod: the workspace PVC mounted, the task config's tolerations, node selector and affinity,
    the labels and annotations (a runtime patch of `node`)."""
    from kubeflow.trainer.constants import constants
    from kubeflow_trainer_api import models

    pod: dict[str, Any] = {}
    if options.pvc:
        pod["volumes"] = [{"name": "workspace", "persistentVolumeClaim": {"claimName": options.pvc}}]
        pod["containers"] = [
            {"name": constants.NODE, "volumeMounts": [{"name": "workspace", "mountPath": options.mount_path}]}
        ]
    placement = (("tolerations", list(options.tolerations)), ("nodeSelector", options.node_selector),
                 ("affinity", options.affinity))  # fmt: skip
    pod.update({key: value for key, value in placement if value})
    metadata = {k: v for k, v in (("labels", labels), ("annotations", annotations)) if v}
    template = {"metadata": metadata, "spec": pod} if metadata else {"spec": pod}
    job = {"name": constants.NODE, "template": {"spec": {"template": template}}}
    patch = {"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job]}}}}
    return models.TrainerV1alpha1RuntimePatch.from_dict(patch)


def trainjob_body(trainjob: Any, patch_api: str = RUNTIME_PATCHES) -> dict[str, Any]:
    """What is sent: the model as a dict, its pod patch rewritten as a Trainer v2.1 podTemplateOverride if asked."""
    body = trainjob.to_dict()
    patches = body["spec"].pop("runtimePatches", None)
    if patches and patch_api == POD_TEMPLATE_OVERRIDES:
        overrides = []
        for job in patches[0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            template = job["template"]["spec"]["template"]
            overrides.append({"targetJobs": [{"name": job["name"]}], **template})
        body["spec"][POD_TEMPLATE_OVERRIDES] = overrides
    elif patches:
        body["spec"][RUNTIME_PATCHES] = patches
    return body


def trainjob_yaml(trainjob: Any) -> str:
    import yaml

    return yaml.safe_dump(trainjob.to_dict(), sort_keys=False)


def client_configuration() -> Any:
    """A remote cluster from KUBERNETES_SERVER_URL + KUBERNETES_AUTH_TOKEN (+ KUBERNETES_CA_CERT, the PEM text of
    its CA, as the key `ca.crt` of the --cluster-secret mounts it); None = kubeconfig / in-cluster."""
    url, token = os.environ.get("KUBERNETES_SERVER_URL"), os.environ.get("KUBERNETES_AUTH_TOKEN")
    if not url:
        return None
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    if token:
        configuration.api_key = {"authorization": token}
        configuration.api_key_prefix = {"authorization": "Bearer"}
    ca = os.environ.get("KUBERNETES_CA_CERT", "").strip()
    if ca:  # the client takes a file: a private one, for this process's life
        import tempfile

        with tempfile.NamedTemporaryFile("w", prefix="lora-pipeline-ca-", suffix=".crt", delete=False) as f:
            f.write(ca + "\n")
        configuration.ssl_ca_cert = f.name
    return configuration


def submit(trainjob: Any, wait: bool = False, timeout: float = SUBMIT_TIMEOUT_S) -> str:
    """Create the TrainJob on the cluster (untested against a real cluster). Returns its name.

    Connecting and creating end within `timeout` seconds, or one line: the SDK's client reads from the API
    server with no timeout of its own before anything is sent, so the whole exchange runs under a deadline.
    """
    from lora_pipeline.deadline import Overdue, within
    from lora_pipeline.errors import StageError

    configuration = client_configuration()
    where = getattr(configuration, "host", None) or "the cluster of the current kubeconfig context"
    try:
        client = within(timeout, lambda: _create(trainjob, configuration, timeout))
    except Overdue:
        raise StageError(
            f"the Kubernetes API server ({where}) did not answer within {timeout:g} s; nothing was submitted "
            "that this command knows of (check with kubectl get trainjobs)",
            field="compile --submit",
        ) from None
    except Exception as exc:  # the kubernetes client's many failures: refused, TLS, 4xx/5xx, no kubeconfig
        if isinstance(exc, StageError):
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise StageError(
            f"cannot submit to {where}: {type(exc).__name__}: {reason}", field="compile --submit"
        ) from None
    if wait:
        client.wait_for_job_status(trainjob.metadata.name, timeout=7 * 24 * 3600)
    return trainjob.metadata.name


def _create(trainjob: Any, configuration: Any, timeout: float) -> Any:
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient
    from kubeflow.trainer.constants import constants

    client = TrainerClient(
        KubernetesBackendConfig(namespace=trainjob.metadata.namespace, client_configuration=configuration)
    )
    backend = client.backend  # the SDK's train() builds its own spec; this sends ours, built above, unchanged
    backend.custom_api.create_namespaced_custom_object(
        constants.GROUP,
        constants.VERSION,
        backend.namespace,
        constants.TRAINJOB_PLURAL,
        trainjob.to_dict(),
        _request_timeout=(min(timeout, 10.0), timeout),  # (connect, read) seconds
    )
    return client
