"""A run that failed is not a success: a diverged training stops at its step, exit 2, run.json says failed,
and nothing is registered. In-process through the CLI's entry function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_pipeline.cli import main

pytestmark = pytest.mark.integration


def _run_args(demo_assets, run_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        "-o",
        str(run_dir),
        "--dataset.data_uri",
        str(demo_assets.data_file),
        "--dataset.subset",
        "32",
        "--train.model",
        str(demo_assets.model_dir),
        "--train.epochs",
        "1",
        "--train.effective_batch_size",
        "8",
        "--train.max_seq_len",
        "128",
        "--train.lora_load_in_4bit",
        "false",
        "--train.use_liger",
        "false",
        "--train.threads",
        "1",
        "--eval.tasks",
        demo_assets.task_name,
        "--eval.include_path",
        str(demo_assets.task_dir),
        "--eval.limit",
        "8",
        "--registry.address",
        "local",
        "--registry.model_name",
        "diverged",
        *extra,
    ]


def test_a_non_finite_loss_stops_training_at_its_step(demo_assets, tmp_path: Path, capsys, private_registry) -> None:
    run_dir = tmp_path / "run"
    code = main(_run_args(demo_assets, run_dir, "--train.learning_rate", "1e300"))
    err = capsys.readouterr().err
    assert code == 2
    line = [ln for ln in err.splitlines() if ln.startswith("lora-pipeline: error:")]
    assert len(line) == 1 and "Traceback" not in err
    assert "train: the training loss is" in line[0] and "at step" in line[0] and "learning_rate" in line[0]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["stages"]["train"]["status"] == "failed"
    assert "eval" not in record["stages"] and "register" not in record["stages"]
    assert not (run_dir / "train" / "adapter").exists()
    assert not private_registry.exists() or "diverged" not in private_registry.read_bytes().decode("latin-1")
