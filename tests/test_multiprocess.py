"""Several training processes (torchrun, gloo on CPU): the same steps as one process, rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import cli_exit_code
from helpers import train_config
from lora_pipeline.files import read_json
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.training.batching import StepSampler
from lora_pipeline.training.launch import resolve_num_procs


def test_processes_share_every_step_between_them() -> None:
    lengths = [((i * 37) % 90) + 5 for i in range(50)]
    one = StepSampler(lengths, 8, seed=3)
    ranks = [StepSampler(lengths, 8, seed=3, rank=r, world=2) for r in range(2)]
    for sampler in (one, *ranks):
        sampler.set_epoch(1)
    together = [sorted(a + b) for a, b in zip(*ranks, strict=True)]
    assert together == [sorted(step) for step in one]  # the same rows in the same steps
    assert len(ranks[0]) == len(one) == 7  # 50 rows / 8 a step: 6 full steps and one of 2 rows
    for a, b in zip(*ranks, strict=True):
        assert abs(len(a) - len(b)) <= 1 and a and b


def test_a_last_step_smaller_than_the_processes_joins_the_one_before() -> None:
    sampler = StepSampler([10] * 17, 8, seed=0, world=2)  # 8, 8 and a step of 1 row: too few for 2 processes
    steps = sampler.steps(0)
    assert sorted(len(s) for s in steps) == [8, 9]
    assert sorted(i for s in steps for i in s) == list(range(17))


def test_num_procs_auto_is_one_without_cuda() -> None:
    assert resolve_num_procs("auto") == 1  # no GPU here
    assert resolve_num_procs("3") == 3


@pytest.mark.integration
def test_two_processes_match_one_process_step_by_step(demo_assets, demo_dataset, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # loopback only
    one = read_json(train_adapter(train_config(demo_assets.model_dir), demo_dataset, tmp_path / "one") / "metrics.json")
    out = train_adapter(train_config(demo_assets.model_dir, num_procs="2"), demo_dataset, tmp_path / "two")
    two = read_json(out / "metrics.json")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["effective_batch_size"] == one["effective_batch_size"] == 8 and two["steps"] == one["steps"] == 9
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (one, two)]
    assert len(losses[0]) == 9 and losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-3)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-3)
    # every row trained once, by one process or the other, and counted over both
    assert two["batching"]["real_tokens"] == one["batching"]["real_tokens"] == one["tokens"]["total"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers  # work directory and the launch's config file are gone


@pytest.mark.integration
def test_under_torchrun_the_stage_command_trains_in_place(demo_assets, demo_dataset, tmp_path) -> None:
    """What a TrainJob node runs: torchrun around `lora-pipeline train --input dataset=DIR --out DIR`."""
    out = tmp_path / "train"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "lora_pipeline.cli", "train", "--input", f"dataset={demo_dataset}", "--out", str(out)]
    command += ["--train.model", str(demo_assets.model_dir), "--train.lora_load_in_4bit", "false"]
    command += ["--train.effective_batch_size", "8", "--train.epochs", "1", "--train.max_seq_len", "128"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["steps"] == 9
    assert result.stdout.count(f"train: {out}") == 1  # rank 0 reports; the other process trains quietly


def test_a_run_directory_under_torchrun_is_refused_in_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_exit_code(["run", "-o", str(tmp_path / "run")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and "--train.num_procs N" in stderr
    assert not (tmp_path / "run").exists()


TRAIN = """
import json, logging, sys
from pathlib import Path
from lora_pipeline.config import TrainConfig
from lora_pipeline.stages.train import train_adapter
logging.basicConfig(level=logging.INFO)
train_adapter(TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.mark.integration
def test_two_processes_killed_resume_and_end_as_one_process_does(demo_assets, demo_dataset, tmp_path) -> None:
    import dataclasses
    import json
    import signal
    import time

    import psutil

    cfg = train_config(demo_assets.model_dir, num_procs="2", checkpoint_steps=3, checkpoint_minutes=0.0)
    straight = read_json(
        train_adapter(train_config(demo_assets.model_dir), demo_dataset, tmp_path / "one") / "metrics.json"
    )
    out = tmp_path / "two"
    checkpoints = tmp_path / ".two.work" / "checkpoints"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", TRAIN, json.dumps(dataclasses.asdict(cfg)), str(demo_dataset), str(out)]
    log = open(tmp_path / "launch.log", "w")  # noqa: SIM115 - the process writes it while the test polls
    parent = subprocess.Popen(command, env=env, stderr=log)
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert parent.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    children = psutil.Process(parent.pid).children(recursive=True)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    _, alive = psutil.wait_procs(children, timeout=60)  # torchrun and its workers stop with their parent
    assert not alive
    assert not (out / "metrics.json").exists()
    metrics = read_json(train_adapter(cfg, demo_dataset, out) / "metrics.json")
    assert metrics["resumed_from_step"] and metrics["world_size"] == 2
    resumed = [h["loss"] for h in metrics["history"] if "loss" in h]
    expected = [h["loss"] for h in straight["history"] if "loss" in h]
    assert resumed == pytest.approx(expected, rel=1e-3, abs=1e-3)
