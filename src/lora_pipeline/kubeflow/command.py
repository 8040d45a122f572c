"""`lora-pipeline compile`: the KFP pipeline, one stage's component, or a multi-node TrainJob, as YAML.

Only argparse is needed to declare the command; kfp and the kubeflow SDK load when it runs, so
`lora-pipeline --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from lora_pipeline.config import Config
from lora_pipeline.config.loading import is_k8s_quantity
from lora_pipeline.errors import ConfigError
from lora_pipeline.kubeflow.components import DEFAULT_IMAGE, DEFAULT_PACKAGE_SPEC, EMBED, BuildOptions
from lora_pipeline.stages import NAMES

ACCESS_MODES = ("ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod")
HELP = "Write the Kubeflow pipeline (KFP v2 YAML), one stage's component, or a multi-node TrainJob"


def add_compile_command(
    sub: argparse._SubParsersAction, add_config_flags: Callable[[argparse.ArgumentParser], None]
) -> None:
    p = sub.add_parser(
        "compile",
        help=HELP,
        description=HELP + ". -c YAML and --SECTION.OPTION flags set the pipeline parameters' defaults and "
        "fix the options that are not parameters (e.g. eval.include_path).",
        usage="lora-pipeline compile [-c YAML] [-o FILE] [--component STAGE | --trainjob] [options]",
    )
    defaults = BuildOptions()
    g = p.add_argument_group("compile")
    _add_output_flags(g)
    _add_install_flags(g)
    _add_secret_flags(g, defaults)
    _add_workspace_flags(g, defaults)
    _add_cluster_flags(g)
    _add_trainjob_flags(
        p.add_argument_group("multi-node training as a Kubeflow Trainer TrainJob (train.num_workers nodes)")
    )
    add_config_flags(p)


def _add_output_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("-c", "--config", action="append", default=[], metavar="YAML", help="YAML config file (repeatable)")
    g.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="Output file (default: pipeline.yaml, STAGE_component.yaml; the TrainJob goes to stdout)",
    )
    g.add_argument("--component", choices=NAMES, default=None, help="Write this stage's component alone")


def _add_install_flags(g: argparse._ArgumentGroup) -> None:
    """What each step's container runs, and how it installs this project."""
    g.add_argument("--image", default=DEFAULT_IMAGE, help="Container image of every step (default: %(default)s)")
    g.add_argument(
        "--package-spec",
        default=DEFAULT_PACKAGE_SPEC,
        help=f"What each step pip-installs: '{EMBED}' = this project's wheel, embedded in the YAML, and its "
        "dependencies from the index; or a requirement, wheel URL or git URL; '' if the image "
        "has lora-pipeline[kubeflow] already (default: %(default)s)",
    )
    g.add_argument(
        "--wheel",
        default="",
        metavar="PATH",
        help=f"With --package-spec {EMBED}: embed this lora_pipeline-*.whl (default: build one from the checkout)",
    )
    g.add_argument(
        "--pip-index-url",
        action="append",
        default=[],
        metavar="URL",
        help="Index (mirror) each step installs its packages from (repeatable; default: pip's own)",
    )
    g.add_argument(
        "--pip-trusted-host",
        action="append",
        default=[],
        metavar="HOST",
        help="Host pip trusts without HTTPS (repeatable; default: each --pip-index-url)",
    )
    g.add_argument(
        "--kfp-cache",
        action="store_true",
        help="Let KFP cache the tasks (off by default: the same URI or model id may hold new content)",
    )


def _add_secret_flags(g: argparse._ArgumentGroup, defaults: BuildOptions) -> None:
    """Credentials reach the pods from Kubernetes secrets, by name only."""
    g.add_argument(
        "--hf-token-secret",
        default=defaults.hf_token_secret,
        metavar="NAME",
        help="Kubernetes secret with key HF_TOKEN ('' = none; default: %(default)s)",
    )
    g.add_argument(
        "--aws-secret",
        default=defaults.aws_secret,
        metavar="NAME",
        help="Kubernetes secret with keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[, AWS_SESSION_TOKEN, "
        "AWS_DEFAULT_REGION, AWS_ENDPOINT_URL] ('' = none; default: %(default)s)",
    )
    g.add_argument(
        "--registry-token-secret",
        default=defaults.registry_token_secret,
        metavar="NAME",
        help="Kubernetes secret with key MODEL_REGISTRY_TOKEN ('' = none; default: %(default)s)",
    )
    g.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME=SECRET:KEY",
        help="Set env var NAME in the training pods from key KEY of Kubernetes secret SECRET (repeatable; the "
        "pipeline's train task and --trainjob; and every node of a multi-node train)",
    )


def _add_workspace_flags(g: argparse._ArgumentGroup, defaults: BuildOptions) -> None:
    g.add_argument(
        "--workspace-size",
        default=defaults.workspace_size,
        metavar="SIZE",
        help="Pipeline workspace PVC size, shared with multi-node training ('' = none; default: %(default)s)",
    )
    g.add_argument(
        "--workspace-storage-class",
        default=defaults.workspace_storage_class,
        metavar="NAME",
        help="Workspace PVC storage class (default: the cluster's default StorageClass)",
    )
    g.add_argument(
        "--workspace-access-mode",
        choices=ACCESS_MODES,
        default=defaults.workspace_access_mode,
        help="Workspace PVC access mode; multi-node training needs ReadWriteMany (default: %(default)s)",
    )


# The TrainJob flags (their defaults), which nothing but --trainjob reads.
TRAINJOB_ONLY = {
    "dry_run": False,
    "submit": False,
    "timeout": 60.0,
    "name": "",
    "namespace": None,
    "runtime": "torch-distributed",
    "pvc": "",
    "dataset_dir": "/workspace/dataset",
    "output_dir": "/workspace/train",
}


def _add_trainjob_flags(t: argparse._ArgumentGroup) -> None:
    t.add_argument("--trainjob", action="store_true", help="Write the TrainJob for the train options instead")
    t.add_argument("--dry-run", action="store_true", help="Only print it (the default; --submit creates it)")
    t.add_argument(
        "--submit",
        action="store_true",
        help="Create it on the cluster (kubeconfig, or KUBERNETES_SERVER_URL + KUBERNETES_AUTH_TOKEN)",
    )
    t.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="Most seconds --submit waits for the cluster's API server, in all (default: %(default)s)",
    )
    t.add_argument("--name", default="", help="TrainJob name (default: lora-<random>)")
    t.add_argument("--namespace", default=None, help="Namespace (default: the current context's)")
    t.add_argument("--runtime", default="torch-distributed", help="Training runtime (default: %(default)s)")
    t.add_argument("--pvc", default="", help="PersistentVolumeClaim mounted on every node at /workspace")
    t.add_argument(
        "--dataset-dir",
        default="/workspace/dataset",
        help="A dataset stage output, on every node (default: %(default)s)",
    )
    t.add_argument("--output-dir", default="/workspace/train", help="Train stage output (default: %(default)s)")


def _add_cluster_flags(g: argparse._ArgumentGroup) -> None:
    """Where the pipeline's multi-node train submits its TrainJob (docs/kubeflow.md)."""
    g.add_argument(
        "--cluster-secret",
        default="",
        type=_secret_name,
        metavar="NAME",
        help="Kubernetes secret with keys KUBERNETES_SERVER_URL, KUBERNETES_AUTH_TOKEN[, ca.crt, "
        "KUBERNETES_NAMESPACE]: the cluster a multi-node train submits its TrainJob to ('' = the train pod's "
        "service account, see deploy/trainjob-rbac.yaml)",
    )


def _secret_name(text: str) -> str:
    import re

    if text and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(f"not a Kubernetes secret name (lowercase, digits, '-', '.'): {text!r}")
    return text


def _check_compile_args(args: argparse.Namespace) -> None:
    """The output path and the workspace size, checked before anything is built (kfp would raise ValueError)."""
    if args.workspace_size and not is_k8s_quantity(args.workspace_size):
        raise ConfigError(
            f"not a Kubernetes quantity: {args.workspace_size!r} (e.g. 20Gi, 500Mi, 1Ti)", field="--workspace-size"
        )
    if args.wheel and args.package_spec != EMBED:
        raise ConfigError(f"applies only with --package-spec {EMBED}", field="--wheel")
    if args.workspace_storage_class and not args.workspace_size:
        raise ConfigError("applies only with a workspace (--workspace-size)", field="--workspace-storage-class")
    if args.trainjob and args.component:
        raise ConfigError("writes the TrainJob; --component writes a pipeline component: give one", field="--trainjob")
    for dest, default in TRAINJOB_ONLY.items():
        if not args.trainjob and getattr(args, dest) != default:  # would be ignored without a word
            raise ConfigError("applies only with --trainjob", field=f"--{dest.replace('_', '-')}")
    if not args.output:
        return
    out = Path(args.output)
    if out.is_dir():
        raise ConfigError(f"a directory, not a file: {out}", field="--output")
    if not out.parent.is_dir():
        raise ConfigError(f"no such directory: {out.parent}", field="--output")
    if not args.trainjob and not out.name.endswith((".yaml", ".yml")):
        raise ConfigError(f"expected a .yaml file name, got {out.name!r}", field="--output")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= 86400:  # threading's wait overflows on huge values; a day is already no limit
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 86400 seconds: {text!r}")
    return value


def compile_command(args: argparse.Namespace, config: Config) -> int:
    _check_compile_args(args)

    from lora_pipeline.kubeflow.secret_values import parse_secret_env, refuse_secret_values

    refuse_secret_values(config, args)  # before anything is written: compiled YAML is shared
    secret_env = parse_secret_env(args.secret_env, component=args.component)
    options = BuildOptions(
        secret_env=secret_env,
        image=args.image,
        package_spec=args.package_spec,
        wheel=args.wheel,
        pip_index_urls=tuple(args.pip_index_url),
        pip_trusted_hosts=tuple(args.pip_trusted_host),
        kfp_cache=args.kfp_cache,
        workspace_storage_class=args.workspace_storage_class,
        workspace_access_mode=args.workspace_access_mode,
        hf_token_secret=args.hf_token_secret,
        aws_secret=args.aws_secret,
        registry_token_secret=args.registry_token_secret,
        workspace_size=args.workspace_size,
        cluster_secret=args.cluster_secret,
    )
    try:
        if args.trainjob:
            return _trainjob(args, config, options)
        from lora_pipeline.kubeflow.pipeline import compile_component, compile_pipeline
    except ImportError as exc:
        raise ConfigError(
            f"{exc.name} is not installed: pip install 'lora-pipeline[kubeflow]'", field="compile"
        ) from None
    if args.component:
        path = compile_component(args.component, Path(args.output or f"{args.component}_component.yaml"), config,
                                 options)  # fmt: skip
    else:
        path = compile_pipeline(Path(args.output or "pipeline.yaml"), config, options)
    print(f"compiled: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    if not args.component and args.workspace_size and not args.workspace_storage_class:
        print("workspace: the cluster's default StorageClass (--workspace-storage-class NAME to choose one)")
    if not args.component and config.train.num_workers > 1 and args.workspace_access_mode != "ReadWriteMany":
        print(f"note: train.num_workers {config.train.num_workers} shares the workspace between nodes: "
              "--workspace-access-mode ReadWriteMany")  # fmt: skip
    return 0


def _trainjob(args: argparse.Namespace, config: Config, build: BuildOptions) -> int:
    from lora_pipeline.kubeflow.pipeline import train_secret_refs
    from lora_pipeline.kubeflow.trainjob import TrainJobOptions, build_trainjob, submit, trainjob_yaml

    # A TrainJob has no component to carry an embedded wheel in: its nodes run the image as it is.
    package_spec = "" if build.package_spec == EMBED else build.package_spec
    options = TrainJobOptions(
        image=args.image,
        name=args.name,
        namespace=args.namespace,
        runtime=args.runtime,
        pvc=args.pvc,
        dataset_dir=args.dataset_dir,
        output_dir=args.output_dir,
        secret_env=build.secret_env,
        optional_secret_env=train_secret_refs(build),  # the nodes get what the pipeline's train pod gets
        package_spec=package_spec,
        pip_index_urls=build.pip_index_urls,
    )
    trainjob = build_trainjob(config, options)
    text = trainjob_yaml(trainjob)
    if build.package_spec == EMBED:
        note = f"# The nodes run {args.image} as it is (an embedded wheel cannot travel in a TrainJob):\n"
        text = note + "# build it with the Dockerfile, or --package-spec SPEC pip-installs SPEC on each node.\n" + text
    if args.output:
        Path(args.output).write_text(text)
    elif not args.submit:
        sys.stdout.write(text)
    if args.submit and not args.dry_run:
        print(f"submitted: TrainJob {submit(trainjob, timeout=args.timeout)}")
    return 0
