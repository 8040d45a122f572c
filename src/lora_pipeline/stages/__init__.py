"""The one stage table: each stage's entry function and everything the rest of the project does per stage.

The CLI subcommands, `pipeline.run` (cache keys, run.json, the summary), pre-flight, report.html and the KFP
compiler loop over it; none of them names a stage. Each stage is a plain function
`entry(config_section, *upstream_dirs, out_dir) -> out_dir`: it reads its own config section and the output
directories of its upstream stages (in `upstream` order), and writes one output directory atomically. What a
later stage needs from an earlier one that is not its upstream travels through the stages between (the train
output carries the dataset stage's eval.jsonl and dataset.json to eval and register). One look sideways: in
a run directory, eval reads the register record beside it, only to warn that a registered version keeps
the scores it was registered with. Functions are named as "module:function" and imported when used, so the
CLI starts without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.stages.outputs import (
    DATASET_RECORD,
    EVAL_RESULTS,
    EVAL_ROWS,
    LOSS_CHART,
    METRICS,
    REGISTRATION,
    TRAIN_ROWS,
)


def resolve(target: str) -> Callable[..., Any]:
    """The function a "module:function" string names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Kfp:
    """A stage's KFP component: its name, artifacts and metrics, and what its pod gets."""

    component: str  # the component function's name (the task's name in the pipeline: prepare-dataset, ...)
    output: tuple[str, str]  # (argument, KFP artifact class): the stage's output directory, stored whole
    inputs: dict[str, str] = field(default_factory=dict)  # upstream stage -> argument holding its output
    metrics: tuple[str, str] | None = None  # (Output[Metrics] argument, "module:function": out dir -> scalars)
    chart: tuple[str, str] | None = None  # (Output[HTML] argument, the output file it shows)
    resources: bool = False  # the pod gets the train options' cpu, memory and GPUs
    secrets: tuple[str, ...] = ()  # BuildOptions attributes: the Kubernetes secrets its pod gets as env vars
    spec_inputs: bool = False  # inputs under the schema's `component` names (the spec's training component)
    workspace: bool = False  # `pvc_path` input; an input left out is read from the workspace instead
    task_config: bool = False  # `kubernetes_config` input: the task's pod settings, passed through
    run_inputs: bool = False  # the pipeline run's id and name as inputs (recorded on a registered version)
    only_if: tuple[str, str] | None = None  # (section, field): the task runs only when this parameter is set
    returns: str = ""  # the component's return value (a `str` output), if any
    metadata: str = ""  # "module:function": out dir -> metadata of the output artifact
    configure: str = ""  # "module:function": (task, BuildOptions) -> None, more settings of its task
    launch: str = ""  # "module:function": (config file, layer, inputs, out, arguments) -> True if it ran the stage


@dataclass(frozen=True)
class Stage:
    name: str  # CLI command and run-directory folder
    section: str  # the config section it reads
    upstream: tuple[str, ...]  # stages whose output directories it reads, in argument order
    entry: str  # "module:function"
    help: str
    outputs: tuple[str, ...] = ()  # the files of its output that others read (stages.outputs)
    check: str = ""  # "module:function": pre-flight, (config, preflight.Checking) -> source fingerprint or None
    key: str = ""  # "module:function": (section config, source fingerprint) -> cache-key entries beyond options
    reuse: str = ""  # "module:function": config -> why the completed output is reused unkeyed, or None
    summary: str = ""  # "module:function": out dir -> lines printed after a run
    report: tuple[str, str] | None = None  # report.html section: (title, "module:function": out dir -> HTML)
    kfp: Kfp | None = None

    def function(self) -> Callable[..., Path]:
        return resolve(self.entry)

    def call(self, section_config: Any, inputs: dict[str, Path], out: Path) -> Path:
        return self.function()(section_config, *(inputs[up] for up in self.upstream), out)


_PIPELINE = "lora_pipeline.pipeline"
_KEYS = "lora_pipeline.cache_keys"
_PREFLIGHT = "lora_pipeline.preflight"
_REPORT = "lora_pipeline.reports.run_page"
_SUMMARY = "lora_pipeline.reports.summary"
_RUNTIME = "lora_pipeline.kubeflow.runtime"

STAGES: tuple[Stage, ...] = (
    Stage(
        "dataset",
        "dataset",
        (),
        "lora_pipeline.stages.dataset:prepare_dataset",
        "Fetch, read, validate and split the dataset (train.jsonl, eval.jsonl, dataset.json)",
        outputs=(TRAIN_ROWS, EVAL_ROWS, DATASET_RECORD),
        check=f"{_PREFLIGHT}:check_dataset_stage",
        key=f"{_KEYS}:dataset_key",
        reuse=f"{_PIPELINE}:recorded_only_reason",
        report=("Dataset", f"{_REPORT}:dataset_section"),
        kfp=Kfp("prepare_dataset", ("output_dataset", "Dataset"), secrets=("hf_token_secret", "aws_secret")),
    ),
    Stage(
        "train",
        "train",
        ("dataset",),
        "lora_pipeline.stages.train:train_adapter",
        "LoRA fine-tune on the dataset stage's output (adapter, metrics, loss chart)",
        outputs=(METRICS, LOSS_CHART, EVAL_ROWS, DATASET_RECORD),
        check=f"{_PREFLIGHT}:check_train_stage",
        key=f"{_KEYS}:train_key",
        summary=f"{_SUMMARY}:train_summary",
        report=("Training", f"{_REPORT}:training_section"),
        # The names are the spec's training component's (output_model, output_metrics, output_loss_chart, dataset).
        kfp=Kfp(
            "train_model",
            ("output_model", "Model"),
            {"dataset": "dataset"},
            metrics=("output_metrics", f"{_RUNTIME}:train_metrics"),
            chart=("output_loss_chart", LOSS_CHART),
            resources=True,
            secrets=("hf_token_secret", "aws_secret", "secret_env"),
            spec_inputs=True,
            workspace=True,
            task_config=True,
            returns="training completed",
            metadata=f"{_RUNTIME}:model_metadata",
            configure="lora_pipeline.kubeflow.pipeline:train_task_settings",
            launch=f"{_RUNTIME}:train_on_workers",
        ),
    ),
    Stage(
        "eval",
        "eval",
        ("train",),
        "lora_pipeline.stages.evaluate:evaluate_adapter",
        "lm-eval the base model and base+adapter from the train stage's output",
        outputs=(EVAL_RESULTS,),
        check=f"{_PREFLIGHT}:check_eval_stage",
        key=f"{_KEYS}:eval_key",
        summary=f"{_SUMMARY}:eval_summary",
        report=("Evaluation: base vs tuned", f"{_REPORT}:evaluation_section"),
        kfp=Kfp(
            "evaluate_model",
            ("output_results", "Artifact"),
            {"train": "model"},
            metrics=("output_metrics", f"{_RUNTIME}:eval_metrics"),
            resources=True,  # eval loads the same base model as training
            secrets=("hf_token_secret", "aws_secret"),
        ),
    ),
    Stage(
        "register",
        "registry",
        ("train", "eval"),
        "lora_pipeline.stages.register:register_adapter",
        "Register the train stage's adapter in the model registry (skipped when no address)",
        outputs=(REGISTRATION,),
        check=f"{_PREFLIGHT}:check_register_stage",
        summary=f"{_SUMMARY}:register_summary",
        report=("Registration", f"{_REPORT}:registration_section"),
        kfp=Kfp(
            "register_model",
            ("output_registration", "Artifact"),
            {"train": "model", "eval": "eval_results"},
            secrets=("aws_secret", "registry_token_secret"),
            run_inputs=True,
            only_if=("registry", "address"),  # skipped, not failed, without an address: the task does not run
        ),
    ),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
