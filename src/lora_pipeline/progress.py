"""Training progress as log lines, for runs without a terminal (CI, a pod's log).

transformers prints each logged dict raw when its progress bar is off; this replaces that with one line
every `every_steps` optimizer steps or `every_seconds` seconds, and at the end:
`train: step 40/900 (4%) loss 1.2345 lr 2.0e-04 9,500 tok/s ETA 0:31`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("lora_pipeline.train")


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def make_progress_callback(tokens_per_step: float, every_seconds: float = 30.0) -> Any:
    from transformers import TrainerCallback

    class ProgressLogCallback(TrainerCallback):
        def __init__(self) -> None:
            self.loss: float | None = None
            self.lr: float | None = None
            self.started = self.last_line = time.monotonic()
            self.first_step = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = self.last_line = time.monotonic()
            self.first_step = state.global_step  # resumed runs measure speed from where they started

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            logs = logs or {}
            self.loss = logs.get("loss", self.loss)
            self.lr = logs.get("learning_rate", self.lr)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            every_steps = max(1, -(-state.max_steps // 10))  # about ten lines a run
            now = time.monotonic()
            due = state.global_step % every_steps == 0 or now - self.last_line >= every_seconds
            if state.is_world_process_zero and (due or state.global_step == state.max_steps):
                self.last_line = now
                log.info("train: %s", self.line(state.global_step, state.max_steps, now - self.started))

        def line(self, step: int, total: int, elapsed: float) -> str:
            done = step - self.first_step
            rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
            parts = [f"step {step}/{total} ({100 * step // max(1, total)}%)"]
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4f}")
            if self.lr is not None:
                parts.append(f"lr {self.lr:.1e}")
            if rate:
                parts.append(f"{tokens_per_step * rate:,.0f} tok/s")
                parts.append(f"ETA {format_eta((total - step) / rate)}")
            return " ".join(parts)

    return ProgressLogCallback()
