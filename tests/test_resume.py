"""Interrupted training resumes from its last complete checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import train_config
from lora_pipeline.config import TrainConfig
from lora_pipeline.files import read_json
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.training.checkpoints import last_complete_checkpoint, make_checkpoint_callback, training_key

# The train stage as a process of its own, so that it can be killed: config as JSON, then dataset and output dirs.
# When interrupted, each checkpoint save is followed by a pause, so that a signal sent on seeing it lands in the
# middle of training however busy the machine is (a late signal would find the run finished).
TRAIN = """
import json, logging, os, sys, time
from pathlib import Path
import transformers
from lora_pipeline.config import TrainConfig
from lora_pipeline.stages.train import train_adapter
save = transformers.Trainer._save_checkpoint
def save_then_pause(self, *args, **kwargs):
    save(self, *args, **kwargs)
    time.sleep(float(os.environ.get("PAUSE_AFTER_SAVE", "0")))
transformers.Trainer._save_checkpoint = save_then_pause
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
train_adapter(TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))
"""
STEPS_PER_EPOCH = 9  # 72 train rows / effective batch 8
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


# A checkpoint every 3 steps over 2 epochs: a run can be cut off, and resumed, in either epoch.
RESUMABLE = dict(
    micro_batch_size=4,  # with gradient accumulation: a resume lands between optimizer steps, not micro-batches
    epochs=2,
    learning_rate=3e-3,
    lora_dropout=0.1,  # dropout draws random numbers: a resume must restore the RNG to match
    checkpoint_steps=3,
    checkpoint_minutes=0.0,
)


def start(cfg: TrainConfig, dataset_dir: Path, out: Path, pause: float = 0.0) -> subprocess.Popen:
    """The train stage in a process of its own; `pause` seconds after each checkpoint save."""
    config = json.dumps(dataclasses.asdict(cfg))
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, config, str(dataset_dir), str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PAUSE_AFTER_SAVE": str(pause)},
    )


def finish(cfg: TrainConfig, dataset_dir: Path, out: Path) -> str:
    proc = start(cfg, dataset_dir, out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


def saved_steps(out: Path) -> list[int]:
    """Steps of the checkpoints in the work dir whose trainer_state.json (written last) is whole."""
    steps = []
    for state in out.with_name(f".{out.name}.work").glob("checkpoints/checkpoint-*/trainer_state.json"):
        with contextlib.suppress(OSError, ValueError):  # being written, or cut off by the kill
            steps.append(json.loads(state.read_text())["global_step"])
    return sorted(steps)


def interrupt_after(cfg: TrainConfig, dataset_dir: Path, out: Path, step: int, sig: signal.Signals) -> str:
    """Start training, send `sig` once a checkpoint past `step` is saved; the process's stderr."""
    proc = start(cfg, dataset_dir, out, pause=1.0)
    deadline = time.monotonic() + 300
    while not [s for s in saved_steps(out) if s > step]:
        assert proc.poll() is None, f"training ended before a checkpoint past step {step}: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the interrupted run must not have completed"
    return stderr


def losses(metrics: dict) -> list[float]:
    return [h["loss"] for h in metrics["history"] if "loss" in h]


@pytest.mark.integration
def test_killed_then_interrupted_run_resumes_and_matches_an_uninterrupted_one(
    demo_assets, demo_dataset: Path, tmp_path: Path
) -> None:
    cfg = train_config(demo_assets.model_dir, **RESUMABLE)
    finish(cfg, demo_dataset, tmp_path / "straight")

    out = tmp_path / "interrupted"
    work = out.with_name(f".{out.name}.work")
    interrupt_after(cfg, demo_dataset, out, 0, signal.SIGKILL)
    first = saved_steps(out)[-1]
    # What a kill in the middle of the Trainer's next save leaves: weights written, trainer_state.json cut off.
    partial = work / "checkpoints" / f"checkpoint-{first + 3}"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (partial / "trainer_state.json").write_text('{\n  "best_global_step": null,\n  "global_')

    # Ctrl-C in the second epoch: KeyboardInterrupt, and the work dir stays for the next run.
    stderr = interrupt_after(cfg, demo_dataset, out, STEPS_PER_EPOCH, signal.SIGINT)
    assert f"train: resuming from step {first} of {TOTAL_STEPS}" in stderr
    assert "KeyboardInterrupt" in stderr and not out.exists()
    second = saved_steps(out)[-1]
    assert first < STEPS_PER_EPOCH < second < TOTAL_STEPS

    stderr = finish(cfg, demo_dataset, out)
    assert f"train: resuming from step {second} of {TOTAL_STEPS}" in stderr
    assert not work.exists()  # removed once the stage completed

    a, b = read_json(tmp_path / "straight" / "metrics.json"), read_json(out / "metrics.json")
    assert (a["resumed_from_step"], b["resumed_from_step"]) == (None, second)
    assert a["steps"] == b["steps"] == TOTAL_STEPS
    assert len(losses(a)) == len(losses(b)) == TOTAL_STEPS
    assert max(abs(x - y) for x, y in zip(losses(a), losses(b), strict=True)) < 1e-3
    assert abs(a["mean_loss"] - b["mean_loss"]) < 1e-3 and abs(a["final_loss"] - b["final_loss"]) < 1e-3
    assert abs(a["eval_loss"] - b["eval_loss"]) < 1e-3
    # The epoch-1 evaluation ran before that epoch's checkpoint: both runs have both evaluations.
    assert [h["step"] for h in b["history"] if "eval_loss" in h] == [STEPS_PER_EPOCH, TOTAL_STEPS]
    assert not (out / "checkpoints").exists()  # save_epoch is off: no empty folder


@pytest.mark.integration
def test_a_changed_config_does_not_resume_stale_checkpoints(
    demo_assets, demo_dataset: Path, tmp_path: Path, caplog
) -> None:
    out = tmp_path / "t"
    cfg = train_config(demo_assets.model_dir, **RESUMABLE)
    interrupt_after(cfg, demo_dataset, out, 0, signal.SIGKILL)
    assert saved_steps(out)
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        train_adapter(dataclasses.replace(cfg, learning_rate=1e-3), demo_dataset, out)
    messages = [r.getMessage() for r in caplog.records]
    assert any("discarding checkpoints of a different config or dataset" in m for m in messages)
    assert not any("resuming" in m for m in messages)
    assert read_json(out / "metrics.json")["resumed_from_step"] is None


def test_training_key_covers_what_changes_the_result(demo_dataset: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="some/model")
    key = training_key(cfg, demo_dataset)
    assert training_key(dataclasses.replace(cfg, learning_rate=1e-3), demo_dataset) != key
    assert training_key(dataclasses.replace(cfg, lora_dropout=0.2), demo_dataset) != key
    # Checkpoint intervals and resources do not change what is trained: a run resumes across them.
    same = dataclasses.replace(cfg, checkpoint_steps=7, checkpoint_minutes=1.0, cpu="8", memory="64Gi")
    assert training_key(same, demo_dataset) == key
    edited = tmp_path / "dataset"
    edited.mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        edited.joinpath(name).write_bytes((demo_dataset / name).read_bytes())
    assert training_key(cfg, edited) == key
    with open(edited / "eval.jsonl", "a") as fh:
        fh.write("\n")
    assert training_key(cfg, edited) != key


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def step_end(callback, step: int, max_steps: int = TOTAL_STEPS, should_save: bool = False):
    from transformers import TrainerControl, TrainerState

    state, control = TrainerState(global_step=step, max_steps=max_steps), TrainerControl(should_save=should_save)
    return callback.on_step_end(None, state, control), state


def test_a_checkpoint_is_due_after_checkpoint_minutes_of_training(tmp_path: Path) -> None:
    clock = FakeClock()
    callback = make_checkpoint_callback(TrainConfig(checkpoint_minutes=2.0), tmp_path, STEPS_PER_EPOCH, clock)
    callback.on_train_begin(None, None, None)
    clock.now += 119
    assert not step_end(callback, 1)[0].should_save
    clock.now += 2
    control, state = step_end(callback, 2)
    assert control.should_save
    callback.on_save(None, state, control)  # the clock restarts at each save, whatever triggered it
    clock.now += 119
    assert not step_end(callback, 3)[0].should_save
    off = make_checkpoint_callback(TrainConfig(checkpoint_minutes=0.0), tmp_path, STEPS_PER_EPOCH, clock)
    clock.now += 10_000
    assert not step_end(off, 4)[0].should_save


def test_a_save_due_at_an_epoch_end_waits_for_that_epochs_evaluation(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState

    callback = make_checkpoint_callback(TrainConfig(checkpoint_minutes=0.0), tmp_path, STEPS_PER_EPOCH)
    assert step_end(callback, 3, should_save=True)[0].should_save  # mid-epoch: saved at once
    assert not step_end(callback, STEPS_PER_EPOCH, should_save=True)[0].should_save
    epoch_end = callback.on_epoch_end(None, TrainerState(global_step=STEPS_PER_EPOCH), TrainerControl())
    assert epoch_end.should_save  # after the epoch's evaluation
    # The last step: nothing left to resume, the adapter itself is written next.
    assert not step_end(callback, TOTAL_STEPS, should_save=True)[0].should_save
    assert not callback.on_epoch_end(None, TrainerState(global_step=TOTAL_STEPS), TrainerControl()).should_save


def test_only_complete_checkpoints_are_resumed_from(tmp_path: Path) -> None:
    def checkpoint(step: int, *files: str, state: str = '{"global_step": 1}') -> None:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        for name in files:
            (path / name).write_bytes(b"x")
        (path / "trainer_state.json").write_text(state)

    every = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")
    checkpoint(3, *every)
    checkpoint(6, *every, state='{"global_step": 6, "log_hi')  # cut off while writing its last file
    checkpoint(9, *every[:2])  # half deleted by a rotation that was killed
    (tmp_path / "checkpoint-tmp").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert last_complete_checkpoint(tmp_path / "nowhere") is None
