"""Resumable training: a work directory of Trainer checkpoints, tagged with what they were trained from.

The work directory sits beside the train stage's output (`.train.work/`) and survives kill -9, Ctrl-C
and crashes. It holds `key` (a hash of the options that change training and of the dataset files) and
`checkpoints/checkpoint-N` written by the Trainer every `checkpoint_steps` steps or `checkpoint_minutes`
minutes. A checkpoint counts as complete only once its `trainer_state.json` parses: the Trainer writes
that file last, after the weights, optimizer, scheduler and RNG states.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig, output_options

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def training_key(cfg: TrainConfig, dataset_dir: Path) -> str:
    """What decides the training result: the options that change it and the dataset stage's files."""
    digest = hashlib.sha256(json.dumps(output_options(cfg), sort_keys=True, default=str).encode())
    for name in ("train.jsonl", "eval.jsonl"):
        path = Path(dataset_dir) / name
        if path.exists():
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def prepare_work_dir(work: Path, key: str) -> Path | None:
    """Keep `work` if it was made for `key` and return its last complete checkpoint; else start it afresh."""
    key_file = work / "key"
    if work.exists() and (not key_file.exists() or key_file.read_text().strip() != key):
        log.info("train: discarding checkpoints of a different config or dataset in %s", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    return last_complete_checkpoint(work / "checkpoints")


def last_complete_checkpoint(root: Path) -> Path | None:
    complete = [p for p in Path(root).glob("checkpoint-*") if _step(p) is not None and _is_complete(p)]
    return max(complete, key=_step, default=None)


def _step(path: Path) -> int | None:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _is_complete(path: Path) -> bool:
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return True


def make_checkpoint_callback(cfg: TrainConfig, epoch_dir: Path) -> Any:
    """A TrainerCallback that saves every `checkpoint_minutes` minutes and keeps `save_epoch` checkpoints.

    Step-based saves are the Trainer's own (`save_steps`); the Trainer rotates those, so checkpoints made
    at an epoch end are copied to `epoch_dir`, out of the rotation.
    """
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last_save = time.monotonic()
            self.epoch_end = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            minutes = cfg.checkpoint_minutes
            if minutes and time.monotonic() - self.last_save >= minutes * 60:
                control.should_save = True
            return control

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if cfg.save_epoch:
                control.should_save = self.epoch_end = True
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.last_save = time.monotonic()
            if self.epoch_end and state.is_world_process_zero:
                name = f"checkpoint-{state.global_step}"
                shutil.copytree(Path(args.output_dir) / name, epoch_dir / name, dirs_exist_ok=True)
            self.epoch_end = False
            return control

    return CheckpointCallback()
