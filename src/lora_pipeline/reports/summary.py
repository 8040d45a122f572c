"""What a run prints when it ends: each stage's status, time and folder, then the lines its stages declare
(the loss chart's path, the base-vs-tuned table, the registered version) and the run report's path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.files import read_json
from lora_pipeline.stages import resolve
from lora_pipeline.stages.outputs import EVAL_RESULTS, LOSS_CHART, REGISTRATION


def print_summary(manifest: dict[str, Any]) -> None:
    run_dir = Path(manifest["run_dir"])
    print(f"\nrun directory: {run_dir}")
    for stage in table.STAGES:
        info = manifest["stages"].get(stage.name)
        if info is None:
            continue
        seconds = info.get("seconds")
        timing = f"{seconds:8.1f}s" if seconds is not None else " " * 9
        print(f"  {stage.name:<9} {info['status']:<7} {timing}  {info.get('path', '')}")
    for stage in table.STAGES:
        if stage.name in manifest["stages"]:
            print_stage_summary(stage, run_dir / stage.name)
    if (run_dir / "report.html").exists():
        print(f"run report: {run_dir / 'report.html'}")


def print_stage_summary(stage: table.Stage, out: Path) -> None:
    """The lines a stage declares (its `summary`), from its output folder: after a run, or a stage run alone."""
    for line in resolve(stage.summary)(out) if stage.summary else ():
        print(line)


def train_summary(out: Path) -> list[str]:
    chart = out / LOSS_CHART
    return [f"\nloss chart: {chart}"] if chart.exists() else []


def eval_summary(out: Path) -> list[str]:
    results = out / EVAL_RESULTS
    if not results.exists():
        return []
    from lora_pipeline.evaluation.results import format_table

    return ["\n" + format_table(read_json(results)["comparison"])]


def register_summary(out: Path) -> list[str]:
    registration = out / REGISTRATION
    record = read_json(registration) if registration.exists() else {}
    if not record or record.get("status") == "skipped":
        return []
    lines = [
        f"registered: {record['model_name']} {record['version']} ({record.get('status')}, {record.get('registry')})"
    ]
    if record.get("scores_differ"):
        lines.append("  its eval scores are not this run's: " + ", ".join(record["scores_differ"]))
    return lines
