"""Eval stage: lm-eval on base and base+adapter side by side, offline, on the demo task."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_pipeline.config import DatasetConfig, EvalConfig, TrainConfig
from lora_pipeline.errors import StageError
from lora_pipeline.files import read_json
from lora_pipeline.stages.dataset import prepare_dataset
from lora_pipeline.stages.evaluate import compare, evaluate_adapter, format_table
from lora_pipeline.stages.train import train_adapter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def train_dir(demo_assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evalrun")
    ds = prepare_dataset(DatasetConfig(data_uri=str(demo_assets.data_file), subset=64), root / "dataset")
    cfg = TrainConfig(
        model=str(demo_assets.model_dir),
        effective_batch_size=16,
        epochs=1,
        max_seq_len=128,
        lora_load_in_4bit=False,
        use_liger=False,
    )
    return train_adapter(cfg, ds, root / "train")


def eval_config(demo_assets, **overrides) -> EvalConfig:
    values = dict(tasks=[demo_assets.task_name], include_path=str(demo_assets.task_dir), limit=20, batch_size="8")
    values.update(overrides)
    return EvalConfig(**values)


def test_base_and_tuned_side_by_side(demo_assets, train_dir: Path, tmp_path: Path) -> None:
    out = evaluate_adapter(eval_config(demo_assets), train_dir, tmp_path / "eval")
    results = read_json(out / "eval_results.json")
    task = demo_assets.task_name
    assert results["tuned"]["results"][task]["acc,none"] >= 0
    assert results["base"]["results"][task]["acc,none"] >= 0
    assert results["tuned"]["config"]["model_args"]["peft"].endswith("adapter")
    assert "peft" not in results["base"]["config"]["model_args"]
    acc = next(r for r in results["comparison"] if r["metric"] == "acc")
    assert acc["delta"] == pytest.approx(acc["tuned"] - acc["base"])
    assert acc["tuned_stderr"] is not None
    assert results["chat_template"] is True
    # log_samples defaults to on: one JSONL per model and task, 20 rows each (limit)
    for name in ("base", "tuned"):
        lines = (out / "samples" / f"{name}_{task}.jsonl").read_text().splitlines()
        assert len(lines) == 20


def test_compare_base_off_and_no_samples(demo_assets, train_dir: Path, tmp_path: Path) -> None:
    cfg = eval_config(demo_assets, compare_base=False, log_samples=False, limit=5)
    results = read_json(evaluate_adapter(cfg, train_dir, tmp_path / "eval") / "eval_results.json")
    assert "base" not in results and results["comparison"][0]["base"] is None
    assert not (tmp_path / "eval" / "samples").exists()


def test_unknown_task_is_one_clear_error(demo_assets, train_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="no_such_task") as err:
        evaluate_adapter(eval_config(demo_assets, tasks=["no_such_task"]), train_dir, tmp_path / "eval")
    assert err.value.field == "eval.tasks"
    assert not (tmp_path / "eval").exists()


def test_missing_adapter(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="run the train stage first"):
        evaluate_adapter(EvalConfig(), tmp_path, tmp_path / "eval")


def test_compare_and_table() -> None:
    base = {"results": {"t": {"acc,none": 0.25, "acc_stderr,none": 0.02, "alias": "t"}}}
    tuned = {"results": {"t": {"acc,none": 0.75, "acc_stderr,none": 0.03, "alias": "t"}}}
    rows = compare(base, tuned)
    assert rows == [
        {
            "task": "t",
            "metric": "acc",
            "filter": "none",
            "base": 0.25,
            "base_stderr": 0.02,
            "tuned": 0.75,
            "tuned_stderr": 0.03,
            "delta": 0.5,
        }
    ]
    assert "+0.5000" in format_table(rows)
