"""Resumable training: a work directory of Trainer checkpoints, tagged with what they were trained from.

The work directory sits beside the train stage's output (`.train.work/`) and survives kill -9, Ctrl-C
and crashes. It holds `key` (a hash of the options that change training and of the dataset files) and
`checkpoints/checkpoint-N` written by the Trainer every `checkpoint_steps` steps or `checkpoint_minutes`
minutes.

The Trainer (transformers 5.x, `Trainer._save_checkpoint`) writes a checkpoint in place, file by file:
adapter weights, optimizer, scheduler, RNG states, then `trainer_state.json`, then it deletes the oldest
checkpoints. A kill in between leaves a half-written `checkpoint-N`, so resume uses only complete ones:
`trainer_state.json` parses (written last, and a truncated JSON file does not parse) and the files
before it are there (a kill during rotation can leave an old checkpoint half deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig, output_options
from lora_pipeline.files import hash_file_into, link_tree

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# What resuming reads besides STATE_FILE; RNG states are rng_state.pth, or rng_state_<rank>.pth per process.
NEEDED_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")


def training_key(cfg: TrainConfig, dataset_dir: Path) -> str:
    """What decides the training result: the options that change it and the dataset stage's files."""
    digest = hashlib.sha256(json.dumps(output_options(cfg), sort_keys=True, default=str).encode())
    for name in ("train.jsonl", "eval.jsonl"):
        path = Path(dataset_dir) / name
        if path.exists():
            hash_file_into(digest, path)
    return digest.hexdigest()[:16]


def prepare_work_dir(work: Path, key: str) -> Path | None:
    """Keep `work` if it was made for `key` and return its last complete checkpoint; else start it afresh."""
    key_file = work / "key"
    if work.exists() and (not key_file.exists() or key_file.read_text().strip() != key):
        log.info("train: discarding checkpoints of a different config or dataset in %s", work)
        key_file.unlink(missing_ok=True)  # first: a removal cut off by a kill leaves checkpoints of no key
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    return last_complete_checkpoint(work / "checkpoints")


def last_complete_checkpoint(root: Path) -> Path | None:
    complete = [p for p in Path(root).glob("checkpoint-*") if checkpoint_step(p) is not None and _is_complete(p)]
    return max(complete, key=checkpoint_step, default=None)


def remove_incomplete_checkpoints(root: Path) -> None:
    """After training failed (a full disk, a crash mid-save): the checkpoints that resume would not use. The
    complete ones stay for the next run."""
    for path in Path(root).glob("checkpoint-*"):
        if checkpoint_step(path) is not None and not _is_complete(path):
            log.info("train: removing the incomplete %s", path.name)
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_step(path: Path) -> int | None:
    """N of a `checkpoint-N` directory (None for any other name)."""
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _is_complete(path: Path) -> bool:
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return all((path / name).is_file() for name in NEEDED_FILES) and any(path.glob("rng_state*.pth"))


def make_checkpoint_callback(
    cfg: TrainConfig, epoch_dir: Path, steps_per_epoch: int, clock: Callable[[], float] = time.monotonic
) -> Any:
    """A TrainerCallback that saves every `checkpoint_minutes` minutes and keeps `save_epoch` checkpoints.

    Step-based saves are the Trainer's own (`save_steps`); the Trainer rotates those, so checkpoints made
    at an epoch end are copied to `epoch_dir`, out of the rotation.
    """
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last_save = clock()
            self.save_after_eval = False
            self.epoch_end = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.last_save = clock()  # minutes of training: model loading and a resume's restore excluded
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            minutes = cfg.checkpoint_minutes
            if minutes and clock() - self.last_save >= minutes * 60:
                control.should_save = True
            if minutes and getattr(args, "world_size", 1) > 1:
                # Each process has its own clock, and a save is a joint act (the Trainer waits for all of them):
                # rank 0's decision holds for every process.
                control.should_save = _rank0_decides(control.should_save)
            if control.should_save and state.global_step % steps_per_epoch == 0:
                # An epoch's last step: the Trainer would save before the epoch's evaluation, and a run resumed
                # from that checkpoint would skip it; save after it instead (on_epoch_end). After the very last
                # step there is nothing left to resume: the adapter is written next.
                control.should_save = False
                self.save_after_eval = state.global_step < state.max_steps
            return control

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if cfg.save_epoch or self.save_after_eval:
                control.should_save = True
            self.epoch_end = cfg.save_epoch
            self.save_after_eval = False
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.last_save = clock()
            if self.epoch_end and state.is_world_process_zero:
                # Copied under a temporary name and renamed, so a kill mid-copy leaves no partial epoch checkpoint.
                name = f"checkpoint-{state.global_step}"
                partial = epoch_dir / f".{name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                shutil.copytree(Path(args.output_dir) / name, partial)
                shutil.rmtree(epoch_dir / name, ignore_errors=True)
                partial.rename(epoch_dir / name)
            self.epoch_end = False
            return control

    return CheckpointCallback()


def _rank0_decides(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def link_epoch_checkpoints(epoch_dir: Path, dest: Path) -> None:
    """The `save_epoch` checkpoints into the stage output; none (no folder either) when there are none. Linked,
    not moved: a run killed before its output is renamed into place still has them for its resume."""
    done = sorted(p for p in Path(epoch_dir).glob("checkpoint-*") if checkpoint_step(p) is not None)
    if done:
        dest.mkdir(parents=True, exist_ok=True)
        for path in done:
            link_tree(path, dest / path.name)
