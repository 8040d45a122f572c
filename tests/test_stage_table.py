"""The stage table owns each stage's behaviour: a toy fifth stage, added here alone, is run, pre-flighted,
recorded in run.json, shown in report.html, compiled into the KFP pipeline and run as a component."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from lora_pipeline import cli
from lora_pipeline import stages as table
from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.files import read_json
from lora_pipeline.stages import Kfp, Stage

HERE = "test_stage_table"
CHECKED: list[frozenset[str]] = []


def count_rows(cfg: DatasetConfig, dataset_dir: Path, out: Path) -> Path:
    """The toy stage: counts the dataset stage's train rows (it reads only its upstream output)."""
    rows = (Path(dataset_dir) / "train.jsonl").read_text().splitlines()
    out.mkdir(parents=True, exist_ok=True)
    (out / "count.json").write_text(json.dumps({"rows": len(rows), "seed": cfg.seed}))
    return out


def check_toy(config: Any, checking: Any) -> None:
    CHECKED.append(checking.stages)
    if config.dataset.seed == 13:
        raise ConfigError("the toy stage refuses seed 13", field="dataset.seed")


def toy_key(section: DatasetConfig, source_fingerprint: str | None) -> dict[str, Any]:
    return {"toy_version": 1}


def toy_summary(out: Path) -> list[str]:
    return [f"toy rows: {read_json(out / 'count.json')['rows']}"]


def toy_section(out: Path) -> str:
    record = out / "count.json"
    return f"<p>toy counted {read_json(record)['rows']} rows</p>" if record.is_file() else "<p>no toy</p>"


def toy_metrics(out: Path) -> dict[str, float]:
    return {"rows": float(read_json(out / "count.json")["rows"])}


TOY = Stage(
    "toy",
    "dataset",
    ("dataset",),
    f"{HERE}:count_rows",
    "Count the dataset stage's train rows",
    outputs=("count.json",),
    check=f"{HERE}:check_toy",
    key=f"{HERE}:toy_key",
    summary=f"{HERE}:toy_summary",
    report=("Toy count", f"{HERE}:toy_section"),
    kfp=Kfp(
        "count_rows",
        ("output_count", "Artifact"),
        {"dataset": "dataset"},
        metrics=("output_metrics", f"{HERE}:toy_metrics"),
    ),
)


@pytest.fixture
def toy_table(monkeypatch: pytest.MonkeyPatch) -> tuple[Stage, ...]:
    stages = (*table.STAGES, TOY)
    monkeypatch.setattr(table, "STAGES", stages)
    monkeypatch.setattr(table, "BY_NAME", {s.name: s for s in stages})
    monkeypatch.setattr(table, "NAMES", tuple(s.name for s in stages))
    CHECKED.clear()
    return stages


def test_a_fifth_stage_runs_is_checked_recorded_and_reported(
    toy_table, tmp_path: Path, chat_file: Path, capsys
) -> None:
    run_dir = tmp_path / "run"
    assert cli.main(["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file)]) == 0
    capsys.readouterr()
    assert cli.main(["toy", "-o", str(run_dir)]) == 0  # the CLI subcommand comes from the table too
    assert list(CHECKED) == [frozenset({"toy"})]
    assert "toy rows: 36" in capsys.readouterr().out  # 40 rows, 90% for training
    assert read_json(run_dir / "toy" / "count.json")["rows"] == 36
    manifest = read_json(run_dir / "run.json")
    assert manifest["stages"]["toy"]["status"] == "ran" and read_json(run_dir / "toy" / "stage.json")["key"]
    page = (run_dir / "report.html").read_text()
    assert "<h2>Toy count</h2>" in page and "toy counted 36 rows" in page
    assert cli.main(["toy", "-o", str(run_dir)]) == 0
    assert read_json(run_dir / "run.json")["stages"]["toy"]["status"] == "cached"
    # Its pre-flight runs before it does: a refused option is one line, and the stage is not run again.
    assert cli.main(["toy", "-o", str(run_dir), "--dataset.seed", "13"]) == 2
    assert "dataset.seed: the toy stage refuses seed 13" in capsys.readouterr().err
    # Run alone, as a component runs it, it prints what it declares too.
    capsys.readouterr()
    alone = tmp_path / "alone"
    assert cli.main(["toy", "--input", f"dataset={run_dir / 'dataset'}", "--out", str(alone)]) == 0
    assert capsys.readouterr().out == f"toy: {alone}\ntoy rows: 36\n"


def test_a_fifth_stage_is_compiled_and_run_as_a_component(toy_table, tmp_path: Path, chat_file: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    assert cli.main(["compile", "--package-spec", "", "-o", str(path)]) == 0
    spec = next(yaml.safe_load_all(path.read_text()))  # the pipeline; then its platform (kubernetes) spec
    task = spec["root"]["dag"]["tasks"]["count-rows"]
    assert task["dependentTasks"] == ["prepare-dataset"]
    assert task["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "prepare-dataset"
    outputs = spec["components"]["comp-count-rows"]["outputDefinitions"]["artifacts"]
    assert set(outputs) == {"output_count", "output_metrics"}

    from lora_pipeline.kubeflow.runtime import run_component
    from lora_pipeline.stages.dataset import prepare_dataset

    dataset = prepare_dataset(DatasetConfig(data_uri=str(chat_file)), tmp_path / "dataset")
    logged: dict[str, float] = {}
    arguments = {
        "output_count": SimpleNamespace(path=str(tmp_path / "count"), metadata={}),
        "output_metrics": SimpleNamespace(log_metric=logged.__setitem__),
        "dataset": SimpleNamespace(path=str(dataset)),
    }
    assert run_component("toy", arguments, {"data_uri": str(chat_file)}) is None
    assert logged == {"rows": 36.0}
