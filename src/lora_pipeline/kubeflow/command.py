"""`lora-pipeline compile`: the KFP pipeline, one stage's component, or a multi-node TrainJob, as YAML.

Only argparse is needed to declare the command; kfp and the kubeflow SDK load when it runs, so
`lora-pipeline --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_pipeline.config import Config
from lora_pipeline.config.loading import is_k8s_quantity
from lora_pipeline.errors import ConfigError
from lora_pipeline.files import atomic_file
from lora_pipeline.kubeflow.components import EMBED, BuildOptions
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
    g = p.add_argument_group("compile")
    _add_output_flags(g)
    _add_build_flags(g)
    g.add_argument(
        "--secret-env",
        action="append",
        default=[],
        metavar="NAME=SECRET:KEY",
        help="Set env var NAME in the training pods from key KEY of Kubernetes secret SECRET (repeatable; the "
        "pipeline's train task and --trainjob; and every node of a multi-node train)",
    )
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


def _add_build_flags(g: argparse._ArgumentGroup) -> None:
    """One flag per BuildOptions field with a help: --field-name (or its `flag`), repeatable for a tuple."""
    for field in dataclasses.fields(BuildOptions):
        settings = dict(field.metadata)
        if "help" not in settings:
            continue
        flag = settings.pop("flag", "--" + field.name.replace("_", "-"))
        if isinstance(field.default, bool):
            settings["action"] = "store_true"
        elif isinstance(field.default, tuple):
            settings.update(action="append", default=[])
        else:
            settings["default"] = field.default
        g.add_argument(flag, dest=field.name, **settings)


def _flag_values(args: argparse.Namespace, options: BuildOptions) -> list[tuple[str, str]]:
    """(flag, value) of every compile flag whose value the YAML or the TrainJob holds, for the credentials check:
    all of them, so that a flag added later is checked too."""
    out = []
    for field in dataclasses.fields(BuildOptions):
        if "help" in field.metadata:
            flag = field.metadata.get("flag", "--" + field.name.replace("_", "-"))
            value = getattr(options, field.name)
            out += [(flag, v) for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, str)]
    for name in ("name", "namespace", "runtime", "pvc", "dataset_dir", "output_dir"):  # the TrainJob's own
        if isinstance(getattr(args, name, None), str):
            out.append(("--" + name.replace("_", "-"), getattr(args, name)))
    return out


def _build_options(args: argparse.Namespace, **parsed: Any) -> BuildOptions:
    """BuildOptions from the flags `_add_build_flags` declared, and the options parsed apart (`parsed`)."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildOptions) if "help" in f.metadata}
    return BuildOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in flags.items()}, **parsed)


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


def _check_compiled_config(args: argparse.Namespace, config: Config) -> None:
    """What each step's pre-flight would refuse in the cluster, found at compile when no fact about the cluster
    is needed: the eval pod's pre-flight runs only after the dataset and train pods have."""
    if args.trainjob or args.component not in (None, "eval"):
        return
    from lora_pipeline.evaluation.checks import SPLIT_TASK, check_portable_options

    check_portable_options(config.eval)
    d = config.dataset
    if not args.component and SPLIT_TASK in config.eval.tasks and not d.eval_uri and d.data_split >= 1.0:
        raise ConfigError(
            f"task {SPLIT_TASK!r} scores the dataset stage's held-out rows, and dataset.data_split 1.0 holds none "
            "out: set it below 1 (or dataset.eval_uri)",
            field="eval.tasks",
        )


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
    _check_compiled_config(args, config)

    from lora_pipeline.kubeflow.secret_values import parse_secret_env, refuse_secret_values

    secret_env = parse_secret_env(args.secret_env, component=args.component)
    options = _build_options(args, secret_env=secret_env)
    # before anything is written: compiled YAML is shared
    refuse_secret_values(config, _flag_values(args, options))
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
        with atomic_file(Path(args.output)) as tmp:  # a killed write leaves the previous file whole
            tmp.write_text(text)
    elif not args.submit:
        sys.stdout.write(text)
    if args.submit and not args.dry_run:
        print(f"submitted: TrainJob {submit(trainjob, timeout=args.timeout)}")
    return 0
