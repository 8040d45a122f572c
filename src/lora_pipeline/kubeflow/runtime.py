"""What a compiled component runs inside its pod: the stage's CLI command, then the KFP artifacts.

Every generated component body is one call, `run_component(stage, arguments, fixed)`. It turns the
component's inputs back into a config layer, runs `lora-pipeline STAGE -c LAYER --input UP=DIR --out DIR`
in-process (the same command, checks, logging and one-line errors as on a laptop), then logs metrics and
copies the loss chart into their KFP artifacts. kfp is not imported here: the artifacts arrive as objects
with `.path`, `.metadata` and `log_metric`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.kubeflow.parameters import RUN_INPUTS, stage_inputs
from lora_pipeline.stages import resolve
from lora_pipeline.stages.outputs import ADAPTER, EVAL_RESULTS, METRICS

# Train metrics shown in the KFP UI (scalars of train/metrics.json).
TRAIN_METRICS = ("final_loss", "mean_loss", "eval_loss", "steps", "train_seconds", "tokens_per_second")


def config_layer(stage: str, arguments: dict[str, Any], fixed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{section: options}: the values fixed at compile time, then every input that is not None."""
    section = table.BY_NAME[stage].section
    options = dict(fixed)
    for name, (_, field_name) in stage_inputs(stage).items():
        if arguments.get(name) is not None:
            options[field_name] = arguments[name]
    return {section: options}


def stage_argv(stage: str, config_file: Path, inputs: dict[str, Path], out: Path) -> list[str]:
    """The CLI command a component runs: `STAGE -c CONFIG --input UP=DIR ... --out DIR`."""
    argv = [stage, "-c", str(config_file)]
    for up in table.BY_NAME[stage].upstream:
        argv += ["--input", f"{up}={inputs[up]}"]
    return [*argv, "--out", str(out)]


def run_component(stage: str, arguments: dict[str, Any], fixed: dict[str, Any]) -> str | None:
    """Run one stage as its KFP component: config layer -> CLI command -> artifacts. Returns the task's output."""
    kfp = table.BY_NAME[stage].kfp
    layer = config_layer(stage, arguments, fixed)
    out = Path(arguments[kfp.output[0]].path)
    inputs = {up: _input_dir(stage, up, arguments.get(name), arguments) for up, name in kfp.inputs.items()}
    import yaml

    with tempfile.TemporaryDirectory(prefix="lora-pipeline-") as tmp:
        config_file = Path(tmp) / "config.yaml"
        config_file.write_text(yaml.safe_dump(layer, sort_keys=False))
        config_file.chmod(0o600)
        if not (kfp.launch and resolve(kfp.launch)(config_file, layer, inputs, out, arguments)):
            if kfp.run_inputs:
                os.environ.update({env: str(arguments.get(name) or "") for name, env in RUN_INPUTS.items()})
            _run_cli(stage_argv(stage, config_file, inputs, out))
    if kfp.metrics:
        argument, metrics_of = kfp.metrics
        for name, value in resolve(metrics_of)(out).items():
            arguments[argument].log_metric(name, value)
    if kfp.chart:
        argument, file_name = kfp.chart
        shutil.copyfile(out / file_name, arguments[argument].path)
    if kfp.metadata:
        arguments[kfp.output[0]].metadata.update(resolve(kfp.metadata)(out))
    return kfp.returns or None


def train_on_workers(
    config_file: Path, layer: dict[str, Any], inputs: dict[str, Path], out: Path, arguments: dict[str, Any]
) -> bool:
    """The training component with train.num_workers > 1: a multi-node TrainJob runs the stage (trainjob_run).
    False for one node: the component runs the stage's command itself."""
    if int(layer["train"].get("num_workers", 1)) <= 1:
        return False
    from lora_pipeline.kubeflow.trainjob_run import train_on_cluster

    pvc_path, task_config = arguments.get("pvc_path") or "", arguments.get("kubernetes_config")
    train_on_cluster(config_file, inputs["dataset"], out, pvc_path, task_config)
    return True


def _input_dir(stage: str, upstream: str, artifact: Any, arguments: dict[str, Any]) -> Path:
    """An upstream artifact's directory. A component with the workspace (the training component: the spec's
    `dataset` defaults to None) may be given none: then the upstream output is expected at `<pvc_path>/<stage>`,
    holding the upstream stage's first declared output file."""
    if artifact is not None:
        return Path(artifact.path)
    pvc = arguments.get("pvc_path") or ""
    expected = table.BY_NAME[upstream].outputs[:1]
    if table.BY_NAME[stage].kfp.workspace and pvc and expected and (Path(pvc) / upstream / expected[0]).exists():
        return Path(pvc) / upstream
    raise RuntimeError(f"{stage}: no {upstream} input (and no {upstream} output under pvc_path {pvc!r})")


def _run_cli(argv: list[str]) -> None:
    from lora_pipeline.cli import main

    code = main(argv)
    if code:  # the CLI has already printed its one-line error
        raise RuntimeError(f"lora-pipeline {' '.join(argv[:1])} failed with exit code {code}")


def train_metrics(train_dir: Path) -> dict[str, float]:
    recorded = json.loads((Path(train_dir) / METRICS).read_text())
    return {k: recorded[k] for k in TRAIN_METRICS if isinstance(recorded.get(k), (int, float))}


def eval_metrics(eval_dir: Path) -> dict[str, float]:
    """`<task>/<metric>/<filter>` for the tuned model, and `.../base`, `.../delta` when the base was scored."""
    rows = json.loads((Path(eval_dir) / EVAL_RESULTS).read_text()).get("comparison", [])
    several = len({row.get("precision") for row in rows}) > 1  # as trained (4-bit) and eval.full_precision
    out: dict[str, float] = {}
    for row in rows:
        name = f"{row['task']}/{row['metric']}/{row['filter']}"
        if several:
            name += "/" + str(row.get("precision")).replace(" ", "-")
        for column in ("tuned", "base", "delta"):
            if isinstance(row.get(column), (int, float)):
                out[name if column == "tuned" else f"{name}/{column}"] = row[column]
    return out


def model_metadata(train_dir: Path) -> dict[str, Any]:
    """The output_model artifact's metadata, from the adapter's config."""
    adapter = json.loads((Path(train_dir) / ADAPTER / "adapter_config.json").read_text())
    return {
        "base_model": adapter.get("base_model_name_or_path"),
        "lora_r": adapter.get("r"),
        "lora_alpha": adapter.get("lora_alpha"),
        "adapter_path": os.path.join(str(train_dir), ADAPTER),
    }
