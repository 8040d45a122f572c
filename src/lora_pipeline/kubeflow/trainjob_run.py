"""The training component with `train.num_workers` > 1: a TrainJob on the pipeline workspace, run to its end.

In order: the dataset is copied onto the workspace PVC; the cluster's TrainJob CRD says how a job patches its
pods (`runtimePatches`, Trainer v2.2+, or `podTemplateOverrides`, v2.1; v2.0 is refused in one line); the
TrainJob is created; node 0's log streams into the task's log; the job's status is followed to Complete or
Failed; the job is deleted whatever the outcome; the nodes' output is copied from the workspace into the
component's output. What the nodes need that the pod alone knows (image, package spec, secret *names*) comes
from the compile options, in the env var SETTINGS_ENV; the cluster is the pod's own (service account, see
deploy/trainjob-rbac.yaml) or the one of KUBERNETES_SERVER_URL + KUBERNETES_AUTH_TOKEN (+ KUBERNETES_CA_CERT).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lora_pipeline.errors import LoraPipelineError, StageError, one_line
from lora_pipeline.kubeflow.trainjob import (
    POD_TEMPLATE_OVERRIDES,
    RUNTIME_PATCHES,
    SUBMIT_TIMEOUT_S,
    TrainJobOptions,
    build_trainjob,
    client_configuration,
    trainjob_body,
)
from lora_pipeline.kubeflow.wheel import WHEEL_ENV

SETTINGS_ENV = "LORA_PIPELINE_TRAINJOB"  # JSON: image, package_spec, pip_index_urls, secret_env, optional_secret_env
CRD_NAME = "trainjobs.trainer.kubeflow.org"
POLL_S = 5.0  # between status reads
WAIT_S = 7 * 24 * 3600.0  # a training run's longest wait for its TrainJob
FIELD = "train.num_workers"


def settings_env(
    image: str,
    package_spec: str,
    pip_index_urls: tuple[str, ...],
    secret_env: tuple[tuple[str, str, str], ...],
    optional_secret_env: tuple[tuple[str, str, str], ...],
) -> str:
    """The value of SETTINGS_ENV on the training task: secret names and keys only, never values."""
    return json.dumps({"image": image, "package_spec": package_spec, "pip_index_urls": list(pip_index_urls),
                       "secret_env": [list(r) for r in secret_env],
                       "optional_secret_env": [list(r) for r in optional_secret_env]})  # fmt: skip


def train_on_cluster(config_file: Path, dataset_dir: Path, out: Path, pvc_path: str, task_config: Any = None) -> None:
    """Run the TrainJob; a user error ends the task with one line on stderr (exit 2), as the CLI does."""
    try:
        _train_on_cluster(config_file, dataset_dir, out, pvc_path, task_config)
    except LoraPipelineError as exc:
        from lora_pipeline.redaction import scrub

        sys.stderr.write(f"lora-pipeline: error: {one_line(scrub(str(exc)))}\n")
        raise SystemExit(2) from None


def _train_on_cluster(config_file: Path, dataset_dir: Path, out: Path, pvc_path: str, task_config: Any) -> None:
    from lora_pipeline.config import from_dict, load_yaml, validate
    from lora_pipeline.errors import ConfigError

    volumes = _get(task_config, "volumes") or []
    claim = next((v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v), "")
    if not pvc_path or not claim:
        raise ConfigError("multi-node training needs the pipeline workspace (compile --workspace-size)", field=FIELD)
    config = validate(from_dict(load_yaml(str(config_file))))
    placement = task_placement(task_config)
    settings = json.loads(os.environ.get(SETTINGS_ENV) or "{}")
    work = Path(pvc_path) / "lora-pipeline" / out.parent.name
    shutil.copytree(dataset_dir, work / "dataset", dirs_exist_ok=True)
    options = TrainJobOptions(
        image=settings.get("image") or os.environ.get("LORA_PIPELINE_IMAGE", ""),
        pvc=claim,
        mount_path=pvc_path,
        dataset_dir=str(work / "dataset"),
        output_dir=str(work / "train"),
        namespace=_namespace(),
        secret_env=tuple(tuple(r) for r in settings.get("secret_env", ())),  # type: ignore[misc]
        optional_secret_env=tuple(tuple(r) for r in settings.get("optional_secret_env", ())),  # type: ignore[misc]
        package_spec=_package_on_workspace(settings.get("package_spec", ""), work),
        pip_index_urls=tuple(settings.get("pip_index_urls", ())),
        **placement,
    )
    client, where = _connect(options.namespace)
    patch_api = _call(where, "read the TrainJob CRD", lambda: detect_patch_api(client.backend.custom_api.api_client))
    body = trainjob_body(build_trainjob(config, options), patch_api)
    run_trainjob(client, body, where)
    shutil.copytree(work / "train", out, dirs_exist_ok=True)


def _package_on_workspace(spec: str, work: Path) -> str:
    """A package spec naming a file in this pod (the embedded wheel) is copied onto the workspace, where the
    nodes find it at the same path; an index requirement or URL is left as it is."""
    if spec == "embed":  # the wheel this component installed itself from (kubeflow/wheel.py says where)
        wheel = os.environ.get(WHEEL_ENV, "")
        if not wheel:
            raise StageError("the embedded wheel was not found in this pod; compile the pipeline again",
                             field="--package-spec")  # fmt: skip
        spec = f"{wheel}[kubeflow]"
    path, extras = (spec.split("[", 1) + [""])[:2] if "[" in spec else (spec, "")
    if not spec or not Path(path).is_file():
        return spec
    target = work / "package" / Path(path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)
    return str(target) + (f"[{extras}" if extras else "")


def _connect(namespace: str | None) -> tuple[Any, str]:
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    from lora_pipeline.deadline import Overdue, within

    configuration = client_configuration()
    where = getattr(configuration, "host", None) or "the cluster of this pod's service account"
    config = KubernetesBackendConfig(namespace=namespace, client_configuration=configuration)
    try:  # the SDK reads a config map with no timeout of its own
        return within(SUBMIT_TIMEOUT_S, lambda: TrainerClient(config)), where
    except Overdue:
        raise StageError(f"the Kubernetes API server ({where}) did not answer within {SUBMIT_TIMEOUT_S:g} s",
                         field=FIELD) from None  # fmt: skip
    except Exception as exc:
        raise StageError(f"cannot connect to {where}: {_reason(exc)}", field=FIELD) from None


def detect_patch_api(api_client: Any) -> str:
    """`runtimePatches` or `podTemplateOverrides`: whichever field the cluster's TrainJob CRD has."""
    from kubernetes import client

    response = client.ApiextensionsV1Api(api_client).read_custom_resource_definition(
        CRD_NAME, _preload_content=False, _request_timeout=(10.0, SUBMIT_TIMEOUT_S)
    )
    crd = json.loads(response.data)
    fields: set[str] = set()
    for version in crd["spec"]["versions"]:
        if version["name"] == "v1alpha1":
            fields = set(version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"])
    for api in (RUNTIME_PATCHES, POD_TEMPLATE_OVERRIDES):
        if api in fields:
            return api
    raise StageError(
        "the cluster's TrainJob CRD has neither spec.runtimePatches (Kubeflow Trainer v2.2+) nor "
        "spec.podTemplateOverrides (v2.1): this Trainer release is not supported, upgrade it to v2.1 or later",
        field=FIELD,
    )


def run_trainjob(client: Any, body: dict[str, Any], where: str) -> None:
    """Create the TrainJob, stream node 0's log, wait for Complete (or one line naming the failure), delete it."""
    from kubeflow.trainer.constants import constants

    name = body["metadata"]["name"]
    api = client.backend.custom_api
    namespace = client.backend.namespace
    args = (constants.GROUP, constants.VERSION, namespace, constants.TRAINJOB_PLURAL)
    timeout = (10.0, SUBMIT_TIMEOUT_S)
    _call(where, f"create TrainJob {name}", lambda: api.create_namespaced_custom_object(
        *args, body, _request_timeout=timeout))  # fmt: skip
    print(f"TrainJob {namespace}/{name} created ({body['spec']['trainer']['numNodes']} nodes)", flush=True)
    try:
        _follow(client, name, namespace, where)
    finally:
        try:
            client.delete_job(name)
            print(f"TrainJob {namespace}/{name} deleted", flush=True)
        except Exception as exc:  # the job's own outcome matters more: say so, do not mask it
            print(f"warning: TrainJob {namespace}/{name} not deleted: {_reason(exc)}", file=sys.stderr, flush=True)


def _follow(client: Any, name: str, namespace: str, where: str) -> None:
    from kubeflow.trainer.constants import constants

    api = client.backend.custom_api
    args = (constants.GROUP, constants.VERSION, namespace, constants.TRAINJOB_PLURAL, name)
    deadline = time.monotonic() + WAIT_S
    streamed = False
    while time.monotonic() < deadline:
        job = _call(where, f"read TrainJob {name}", lambda: api.get_namespaced_custom_object(
            *args, _request_timeout=(10.0, SUBMIT_TIMEOUT_S)))  # fmt: skip
        state, why = job_state(job)
        if state == "Complete":
            print(f"TrainJob {namespace}/{name} complete", flush=True)
            return
        if state == "Failed":
            raise StageError(f"TrainJob {namespace}/{name} failed: {why}", field=FIELD)
        if not streamed:
            streamed = _stream_node_log(client.backend.core_api, name, namespace)
        time.sleep(POLL_S)
    raise StageError(f"TrainJob {namespace}/{name} did not finish within {WAIT_S:g} s", field=FIELD)


def job_state(job: dict[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running" | "Created", why) from the TrainJob's status conditions."""
    conditions = (job.get("status") or {}).get("conditions") or []
    true = {c.get("type"): c for c in conditions if c.get("status") == "True"}
    for state in ("Failed", "Complete"):
        if state in true:
            c = true[state]
            return state, ": ".join(p for p in (c.get("reason"), c.get("message")) if p) or state
    return ("Running" if (job.get("status") or {}).get("jobsStatus") else "Created"), ""


def _stream_node_log(core: Any, name: str, namespace: str) -> bool:
    """Copy node 0's log into this task's log, until its container ends. False while it has not started."""
    from kubeflow.trainer.constants import constants

    selector = (f"{constants.JOBSET_NAME_LABEL}={name},{constants.JOBSET_RJOB_NAME_LABEL}={constants.NODE},"
                f"{constants.JOB_INDEX_LABEL}=0")  # fmt: skip
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=(10.0, 60.0)).items
        pod = next((p for p in pods if p.status and p.status.phase in ("Running", "Succeeded", "Failed")), None)
        if pod is None:
            return False
        response = core.read_namespaced_pod_log(pod.metadata.name, namespace, container=constants.NODE,
                                                follow=True, _preload_content=False)  # fmt: skip
        pending = b""
        for chunk in response.stream(4096):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                print(f"[node-0] {line.decode(errors='replace')}", flush=True)
        if pending:
            print(f"[node-0] {pending.decode(errors='replace')}", flush=True)
    except Exception as exc:  # the log is a convenience: the job's status decides the outcome
        print(f"warning: node 0's log could not be read: {_reason(exc)}", file=sys.stderr, flush=True)
    return True


def _call(where: str, what: str, request: Any) -> Any:
    try:
        return request()
    except LoraPipelineError:
        raise
    except Exception as exc:  # refused, TLS, 401/403/422 from the API server
        hint = " (the pod's service account needs deploy/trainjob-rbac.yaml)" if "403" in _reason(exc) else ""
        raise StageError(f"cannot {what} on {where}: {_reason(exc)}{hint}", field=FIELD) from None


def _reason(exc: Exception) -> str:
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status and isinstance(reason, str):
        body = getattr(exc, "body", "") or ""
        try:  # the API server's Status object says why (e.g. the schema error of a 422)
            message = str(json.loads(body).get("message", ""))
        except (ValueError, AttributeError):
            message = ""
        return f"{status} {reason}" + (f": {message}" if message else "")
    text = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# kfp.dsl.TaskConfig fields forwarded to every node, with the JSON shape each must have (Kubernetes checks the rest).
_PLACEMENT = (("resources", dict), ("tolerations", list), ("node_selector", dict), ("affinity", dict))


def task_placement(task_config: Any) -> dict[str, Any]:
    """The TrainJobOptions fields from the task config: resources, tolerations, node selector, affinity.
    A field of the wrong shape is one line naming it, before anything is created on the cluster."""
    from lora_pipeline.errors import ConfigError

    found: dict[str, Any] = {}
    for name, kind in _PLACEMENT:
        value = _get(task_config, name)
        if not value:
            continue
        items = value if kind is list else [value]
        if not isinstance(value, kind) or not all(isinstance(item, dict) for item in items):
            raise ConfigError(f"must be a {'list of objects' if kind is list else 'JSON object'}, "
                              f"got {type(value).__name__}", field=f"kubernetes_config.{name}")  # fmt: skip
        found[name] = tuple(value) if kind is list else value
    for part in ("requests", "limits"):
        if not isinstance((found.get("resources") or {}).get(part) or {}, dict):
            raise ConfigError("must be a JSON object", field=f"kubernetes_config.resources.{part}")
    return found


def _get(task_config: Any, name: str) -> Any:
    return task_config.get(name) if isinstance(task_config, dict) else getattr(task_config, name, None)


def _namespace() -> str | None:
    """KUBERNETES_NAMESPACE (a key of the cluster secret), else the pod's own namespace."""
    if os.environ.get("KUBERNETES_NAMESPACE"):
        return os.environ["KUBERNETES_NAMESPACE"]
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else None
