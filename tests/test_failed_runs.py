"""A run that failed is not a success: a diverged training stops at its step, exit 2, run.json says failed,
and nothing is registered; a stage whose recorded outputs are missing or changed reruns instead of being
called cached. In-process through the CLI's entry function."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_pipeline.cli import main


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


def _nan_weights(model: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * float("nan")  # valid file, poisoned values
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    return ["--train.model", str(model)]


def _huge_learning_rate(model: Path) -> list[str]:
    return ["--train.learning_rate", "1e300"]


@pytest.mark.integration
@pytest.mark.parametrize("cause", [_huge_learning_rate, _nan_weights], ids=["learning-rate-1e300", "nan-weights"])
def test_a_non_finite_loss_stops_training_at_its_step(demo_assets, tmp_path: Path, capsys, private_registry, cause):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_assets.model_dir, tmp_path / "model")
    code = main(_run_args(demo_assets, run_dir, *cause(tmp_path / "model")))
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


def _delete(rel: str) -> Callable[[Path], None]:
    return lambda out: (out / rel).unlink()


def _flip_a_byte(rel: str) -> Callable[[Path], None]:
    def flip(out: Path) -> None:
        data = bytearray((out / rel).read_bytes())
        data[len(data) // 2] ^= 0x01  # same size: only the recorded sha256 tells
        (out / rel).write_bytes(bytes(data))

    return flip


def _append(rel: str) -> Callable[[Path], None]:
    return lambda out: (out / rel).write_bytes((out / rel).read_bytes() + b"\n")


# (id, how the dataset stage's output is spoiled, text of the one "rerunning" line)
CACHE_CASES = [
    ("file-deleted", _delete("train.jsonl"), "dataset: rerunning: dataset/train.jsonl is missing"),
    (
        "same-size-edit",
        _flip_a_byte("eval.jsonl"),
        "dataset: rerunning: dataset/eval.jsonl changed since the stage ran",
    ),
    ("grown", _append("dataset.json"), "dataset: rerunning: dataset/dataset.json changed since the stage ran"),
]


@pytest.mark.parametrize(("spoil", "expected"), [c[1:] for c in CACHE_CASES], ids=[c[0] for c in CACHE_CASES])
def test_a_cached_stage_with_changed_outputs_reruns(tmp_path: Path, chat_file: Path, caplog, spoil, expected) -> None:
    run_dir = tmp_path / "run"
    args = ["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file)]
    assert main(args) == 0
    record = json.loads((run_dir / "dataset" / "stage.json").read_text())
    assert set(record["outputs"]) >= {"train.jsonl", "eval.jsonl", "dataset.json"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        assert main(args) == 0
    assert any("dataset: cached" in r.getMessage() for r in caplog.records)
    spoil(run_dir / "dataset")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        assert main(args) == 0
    assert [r.getMessage() for r in caplog.records if "rerunning" in r.getMessage()] == [expected]
    assert json.loads((run_dir / "run.json").read_text())["stages"]["dataset"]["status"] == "ran"
    assert main(args) == 0  # the rerun's outputs are intact again
    assert json.loads((run_dir / "run.json").read_text())["stages"]["dataset"]["status"] == "cached"


@pytest.mark.integration
def test_a_deleted_adapter_reruns_train_and_eval(demo_assets, tmp_path: Path, caplog, capsys) -> None:
    run_dir = tmp_path / "run"
    args = _run_args(demo_assets, run_dir, "--registry.address", "none")
    assert main(args) == 0
    assert main(args) == 0  # intact outputs: every stage is reused
    statuses = {name: info["status"] for name, info in json.loads((run_dir / "run.json").read_text())["stages"].items()}
    assert statuses == {"dataset": "cached", "train": "cached", "eval": "cached", "register": "cached"}
    adapter = run_dir / "train" / "adapter"
    shutil.rmtree(adapter)
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        assert main(["eval", "-o", str(run_dir)]) == 2
    assert any(r.getMessage().startswith("eval: rerunning: train/adapter/") for r in caplog.records)
    assert "no adapter" in capsys.readouterr().err
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        assert main(["train", "-o", str(run_dir)]) == 0
    assert any(r.getMessage().startswith("train: rerunning: train/adapter/") for r in caplog.records)
    assert (adapter / "adapter_config.json").is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        assert main(["eval", "-o", str(run_dir)]) == 0  # the retrained adapter is scored again
    assert "eval: rerunning: train was redone since this stage ran" in [r.getMessage() for r in caplog.records]
