"""The whole demo through the CLI, as the README runs it: four stages, a manifest, and a real gain."""

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


@pytest.fixture(scope="module")
def demo_run(demo_assets, tmp_path_factory) -> tuple[Path, object]:
    home = Path(demo_assets.model_dir).parents[1]  # the session's LORA_PIPELINE_HOME
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    out = run_cli("demo", "-o", str(run_dir), env={"LORA_PIPELINE_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


@pytest.mark.integration
def test_demo_runs_all_stages_and_tuned_beats_base_by_40_points(demo_run, demo_assets, monkeypatch) -> None:
    monkeypatch.delenv("LORA_PIPELINE_REGISTRY")  # the module's demo run registered in its home's registry
    run_dir, out = demo_run
    manifest = read_json(run_dir / "run.json")
    assert [s for s, info in manifest["stages"].items() if info["status"] == "ran"] == [
        "dataset",
        "train",
        "eval",
        "register",
    ]
    assert manifest["config"]["train"]["lora_r"] == 16 and "torch" in manifest["versions"]
    acc = next(r for r in read_json(run_dir / "eval" / "eval_results.json")["comparison"] if r["metric"] == "acc")
    assert acc["tuned"] >= acc["base"] + 0.40, acc
    assert acc["base"] <= 0.35  # near chance (5 classes)
    assert "demo_topic" in out.stdout and "acc" in out.stdout  # the base-vs-tuned table is printed
    registration = read_json(run_dir / "register" / "registration.json")
    assert (registration["status"], registration["registry_kind"]) == ("registered", "local")
    assert "registered: demo-topic 1.0.0 (registered" in out.stdout
    listed = run_cli("models", "list", env={"LORA_PIPELINE_HOME": str(Path(demo_assets.model_dir).parents[1])})
    assert "demo-topic" in listed.stdout and "1.0.0" in listed.stdout


@pytest.mark.integration
def test_second_run_is_cached_and_eval_option_reruns_only_eval(demo_run, demo_assets) -> None:
    run_dir, _ = demo_run
    home = str(Path(demo_assets.model_dir).parents[1])
    env = {"LORA_PIPELINE_HOME": home, "HF_HUB_OFFLINE": "1"}
    out = run_cli("demo", "-o", str(run_dir), env=env)
    assert out.returncode == 0
    assert {info["status"] for info in read_json(run_dir / "run.json")["stages"].values()} == {"cached"}
    out = run_cli("demo", "-o", str(run_dir), "--eval.limit", "10", "--eval.compare_base", "false", env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    stages = read_json(run_dir / "run.json")["stages"]
    assert {s: i["status"] for s, i in stages.items()} == {
        "dataset": "cached",
        "train": "cached",
        "eval": "ran",
        "register": "ran",
    }


@pytest.mark.integration
def test_bad_eval_option_fails_before_any_stage_and_keeps_outputs(demo_run, demo_assets) -> None:
    run_dir, _ = demo_run
    home = str(Path(demo_assets.model_dir).parents[1])
    adapter = (run_dir / "train" / "adapter" / "adapter_model.safetensors").read_bytes()
    before = read_json(run_dir / "run.json")
    out = run_cli("demo", "-o", str(run_dir), "--eval.tasks", "no_such_task", env={"LORA_PIPELINE_HOME": home})
    assert out.returncode == 2 and "eval.tasks" in out.stderr.strip().splitlines()[-1]
    assert (run_dir / "train" / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (run_dir / "eval" / "eval_results.json").exists()  # the previous eval's results are intact
    assert read_json(run_dir / "run.json") == before  # pre-flight: nothing ran, nothing was rewritten


def _checkpoints(run_dir: Path) -> list[int]:
    """Steps of the complete resumable checkpoints in the train stage's work directory."""
    return sorted(
        int(p.parent.name.rsplit("-", 1)[1]) for p in run_dir.glob(".train.work/**/checkpoint-*/trainer_state.json")
    )


def _start_and_wait_for_checkpoint(args: list[str], env: dict, run_dir: Path, after: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_pipeline.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not [s for s in _checkpoints(run_dir) if s > after]:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.2)
    return proc


@pytest.mark.integration
def test_ctrl_c_and_kill_9_then_the_same_command_resumes(demo_assets, tmp_path: Path) -> None:
    home = str(Path(demo_assets.model_dir).parents[1])
    env = {"LORA_PIPELINE_HOME": home, "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    args = ["demo", "-o", str(run_dir), "--train.epochs", "3", "--train.checkpoint_steps", "30", "--eval.limit", "20"]

    proc = _start_and_wait_for_checkpoint(args, env, run_dir, after=0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert "interrupted" in proc.stderr.read()
    record = read_json(run_dir / "run.json")
    assert record["status"] == "interrupted" and record["stages"]["train"]["status"] == "interrupted"
    first = _checkpoints(run_dir)[-1]

    proc = _start_and_wait_for_checkpoint(args, env, run_dir, after=first)
    proc.kill()  # kill -9: no handler runs
    proc.wait(timeout=60)
    second = _checkpoints(run_dir)[-1]
    assert second > first

    out = run_cli(*args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resuming from step {second}" in out.stderr
    record = read_json(run_dir / "run.json")
    assert record["status"] == "completed"
    assert [record["stages"][s]["status"] for s in ("dataset", "train", "eval")] == ["cached", "ran", "ran"]
    assert read_json(run_dir / "train" / "metrics.json")["steps"] == 270  # 720 rows / 8 per step x 3 epochs
    assert not list(run_dir.glob(".train.work*"))  # the work directory is gone once the stage completed
