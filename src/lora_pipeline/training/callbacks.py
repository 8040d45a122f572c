"""The train stage's progress as Trainer callbacks: the lines `progress.progress_line` formats, logged about ten
times a run (or every `every_seconds`) without a terminal, redrawn in place on one (`progress.TerminalLine`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import TrainerCallback

from lora_pipeline.progress import TerminalLine, progress_line


class ProgressLogCallback(TrainerCallback):
    """Progress lines logged to `logger` (on the main process only); with `live` (a terminal), the line is
    redrawn at every step instead, and logged once at the end."""

    def __init__(
        self,
        tokens_per_step: float,
        logger: logging.Logger,
        every_seconds: float = 30.0,
        live: TerminalLine | None = None,
    ) -> None:
        self.tokens_per_step, self.logger, self.every_seconds, self.live = tokens_per_step, logger, every_seconds, live
        self.loss: float | None = None
        self.lr: float | None = None
        self.started = self.last_line = time.monotonic()
        self.first_step = 0
        self.pending = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = self.last_line = time.monotonic()
        self.first_step = state.global_step  # a resumed run measures its speed from where it started

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        if self.live is not None:
            self._redraw(state, control)
            return
        if self.pending:  # the line waited for a loss that was not logged
            self.emit(state)
        every_steps = max(1, -(-state.max_steps // 10))  # about ten lines a run
        step = state.global_step
        due = step % every_steps == 0 or step == state.max_steps
        if due or time.monotonic() - self.last_line >= self.every_seconds:
            # The Trainer logs this step's loss right after on_step_end: when it will, the line waits for it.
            self.pending = bool(control.should_log)
            if not self.pending:
                self.emit(state)

    def _redraw(self, state: Any, control: Any) -> None:
        if state.global_step < state.max_steps:
            self.live.draw(f"train: {self.text(state)}")
            return
        self.pending = bool(control.should_log)  # the last line waits for the last loss
        if not self.pending:
            self.emit(state)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.loss, self.lr = logs["loss"], logs.get("learning_rate", self.lr)
            if self.pending:
                self.emit(state)
            elif self.live is not None and state.is_world_process_zero:
                self.live.draw(f"train: {self.text(state)}", force=True)
        if "eval_loss" in logs and state.is_world_process_zero:
            self.logger.info(
                "train: eval loss %.4f at step %d/%d", logs["eval_loss"], state.global_step, state.max_steps
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.live is not None:
            if self.pending:
                self.emit(state)
            self.live.close()

    def text(self, state: Any) -> str:
        done, elapsed = state.global_step - self.first_step, time.monotonic() - self.started
        rate = done / elapsed if done > 0 and elapsed > 0 else 0.0
        return progress_line(state.global_step, state.max_steps, self.loss, self.lr, rate, self.tokens_per_step)

    def emit(self, state: Any) -> None:
        self.pending = False
        self.last_line = time.monotonic()
        self.logger.info("train: %s", self.text(state))  # on a terminal the filter clears the live line first
