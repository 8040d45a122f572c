"""kill -9 twice during training, then the same command: it resumes and ends where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from lora_pipeline.files import read_json

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset_dir(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "dataset"
    done = run_cli(
        "dataset", "--dataset.data_uri", str(demo_assets.data_file), "--dataset.subset", "200", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    return out


def train_args(demo_assets, dataset_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--input",
        f"dataset={dataset_dir}",
        "--out",
        str(out),
        "--train.model",
        str(demo_assets.model_dir),
        "--train.lora_load_in_4bit",
        "false",
        "--train.use_liger",
        "false",
        "--train.effective_batch_size",
        "8",
        "--train.epochs",
        "2",
        "--train.learning_rate",
        "3e-3",
        "--train.lora_dropout",
        "0.1",  # dropout draws random numbers: a resume must restore the RNG to match
        "--train.checkpoint_steps",
        "5",
        *extra,
    ]


def complete_checkpoints(out: Path) -> list[int]:
    work = out.with_name(f".{out.name}.work") / "checkpoints"
    return sorted(int(p.parent.name.split("-")[1]) for p in work.glob("checkpoint-*/trainer_state.json"))


def kill_after_checkpoint(args: list[str], out: Path, after: int) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_pipeline.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.monotonic() + 300
    while not [s for s in complete_checkpoints(out) if s > after]:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return complete_checkpoints(out)[-1]


def test_killed_twice_then_resumed_matches_an_uninterrupted_run(demo_assets, dataset_dir: Path, tmp_path: Path) -> None:
    reference = run_cli(*train_args(demo_assets, dataset_dir, tmp_path / "straight"))
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "interrupted"
    args = train_args(demo_assets, dataset_dir, out)
    first = kill_after_checkpoint(args, out, after=0)
    second = kill_after_checkpoint(args, out, after=first + 5)
    assert 0 < first < second
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr[-2000:]
    assert f"train: resuming from step {second} of 46" in final.stderr

    a, b = read_json(tmp_path / "straight" / "metrics.json"), read_json(out / "metrics.json")
    assert b["resumed_from_step"] == second and a["steps"] == b["steps"] == 46
    assert abs(a["train_loss"] - b["train_loss"]) < 1e-3
    assert abs(a["final_loss"] - b["final_loss"]) < 1e-3
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (a, b)]
    assert len(losses[0]) == len(losses[1]) and max(abs(x - y) for x, y in zip(*losses, strict=True)) < 1e-3
    assert not out.with_name(f".{out.name}.work").exists()


def test_a_changed_config_does_not_resume_stale_checkpoints(demo_assets, dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "t"
    kill_after_checkpoint(train_args(demo_assets, dataset_dir, out), out, after=0)
    changed = run_cli(*train_args(demo_assets, dataset_dir, out, "--train.learning_rate", "1e-3"))
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "resuming" not in changed.stderr and "discarding checkpoints" in changed.stderr
    assert read_json(out / "metrics.json")["resumed_from_step"] is None
