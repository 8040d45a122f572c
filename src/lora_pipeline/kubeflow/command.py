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
from lora_pipeline.kubeflow.components import DEFAULT_IMAGE, DEFAULT_PACKAGE_SPEC, BuildOptions
from lora_pipeline.stages import NAMES

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
    g.add_argument("-c", "--config", action="append", default=[], metavar="YAML", help="YAML config file (repeatable)")
    g.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="Output file (default: pipeline.yaml, STAGE_component.yaml; the TrainJob goes to stdout)",
    )
    g.add_argument("--component", choices=NAMES, default=None, help="Write this stage's component alone")
    g.add_argument("--image", default=DEFAULT_IMAGE, help="Container image of every step (default: %(default)s)")
    g.add_argument(
        "--package-spec",
        default=DEFAULT_PACKAGE_SPEC,
        help="What each step pip-installs: a requirement, wheel URL or git URL; '' if the image "
        "has lora-pipeline[kubeflow] already (default: %(default)s)",
    )
    g.add_argument(
        "--pip-index-url",
        action="append",
        default=[],
        metavar="URL",
        help="Index to install --package-spec from (repeatable; default: pip's own)",
    )
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
    g.add_argument(
        "--workspace-size",
        default=defaults.workspace_size,
        metavar="SIZE",
        help="Pipeline workspace PVC size, shared with multi-node training ('' = none; default: %(default)s)",
    )
    _add_cluster_flags(g)
    t = p.add_argument_group("multi-node training as a Kubeflow Trainer TrainJob (train.num_workers nodes)")
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
    add_config_flags(p)


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
        pip_index_urls=tuple(args.pip_index_url),
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
    print(f"compiled: {path}")
    return 0


def _trainjob(args: argparse.Namespace, config: Config, build: BuildOptions) -> int:
    from lora_pipeline.kubeflow.pipeline import train_secret_refs
    from lora_pipeline.kubeflow.trainjob import TrainJobOptions, build_trainjob, submit, trainjob_yaml

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
        package_spec=build.package_spec,
        pip_index_urls=build.pip_index_urls,
    )
    trainjob = build_trainjob(config, options)
    text = trainjob_yaml(trainjob)
    if args.output:
        Path(args.output).write_text(text)
    elif not args.submit:
        sys.stdout.write(text)
    if args.submit and not args.dry_run:
        print(f"submitted: TrainJob {submit(trainjob, timeout=args.timeout)}")
    return 0
