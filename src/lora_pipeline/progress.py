"""Training progress as log lines, for runs without a terminal (CI, a pod's log).

transformers prints each logged dict raw when its progress bar is off; this replaces that with one line
about every tenth of the run or every `every_seconds` seconds, whichever comes first, and at the end:
`train: step 40/900 (4%) loss 1.2345 lr 2.0e-04 9,500 tok/s ETA 0:31`, plus one line per evaluation.
"""

from __future__ import annotations

import logging
import time
from typing import Any


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def progress_line(
    step: int, total: int, loss: float | None, lr: float | None, steps_per_second: float, tokens_per_step: float
) -> str:
    parts = [f"step {step}/{total} ({100 * step // max(1, total)}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.1e}")
    if steps_per_second > 0:
        parts.append(f"{tokens_per_step * steps_per_second:,.0f} tok/s")
        parts.append(f"ETA {format_eta((total - step) / steps_per_second)}")
    return " ".join(parts)


def make_progress_callback(tokens_per_step: float, logger: logging.Logger, every_seconds: float = 30.0) -> Any:
    """A TrainerCallback logging progress lines to `logger` (on the main process only)."""
    from transformers import TrainerCallback

    class ProgressLogCallback(TrainerCallback):
        def __init__(self) -> None:
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
            if self.pending:  # the line waited for a loss that was not logged
                self.emit(state)
            every_steps = max(1, -(-state.max_steps // 10))  # about ten lines a run
            step = state.global_step
            due = step % every_steps == 0 or step == state.max_steps
            if due or time.monotonic() - self.last_line >= every_seconds:
                # The Trainer logs this step's loss right after on_step_end: when it will, the line waits for it.
                self.pending = bool(control.should_log)
                if not self.pending:
                    self.emit(state)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                self.loss, self.lr = logs["loss"], logs.get("learning_rate", self.lr)
                if self.pending:
                    self.emit(state)
            if "eval_loss" in logs and state.is_world_process_zero:
                logger.info(
                    "train: eval loss %.4f at step %d/%d", logs["eval_loss"], state.global_step, state.max_steps
                )

        def emit(self, state: Any) -> None:
            self.pending = False
            self.last_line = now = time.monotonic()
            done, elapsed = state.global_step - self.first_step, now - self.started
            rate = done / elapsed if done > 0 and elapsed > 0 else 0.0
            line = progress_line(state.global_step, state.max_steps, self.loss, self.lr, rate, tokens_per_step)
            logger.info("train: %s", line)

    return ProgressLogCallback()


class Meter:
    """Progress of a long read or download: a tqdm bar on a terminal; without one (CI, a pod's log), a log
    line every `every_seconds` and at the end, e.g. `dataset: 1,200,000 rows read (115,000/s)`."""

    def __init__(
        self, logger: logging.Logger, what: str, unit: str, total: int | None = None, every_seconds: float = 10.0
    ) -> None:
        import sys

        self.logger, self.what, self.unit, self.total = logger, what, unit, total
        self.every_seconds, self.count = every_seconds, 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=unit, unit_scale=True, leave=False)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        # With a known total, also a line at each tenth once past a second (a small file stays quiet).
        tenth = self.total and self.count * 10 // self.total > (self.count - n) * 10 // self.total
        tenth = tenth and now - self.started >= 1.0
        if now - self.last >= self.every_seconds or (tenth and self.count < self.total):
            self.last = now
            self.logger.info("%s", self.line(now))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif time.monotonic() - self.started >= self.every_seconds:  # short work needs no closing line
            self.logger.info("%s", self.line(time.monotonic()))

    def line(self, now: float) -> str:
        rate = self.count / max(1e-9, now - self.started)
        of = f" of {self.total:,}" if self.total else ""
        share = f" {100 * self.count // self.total}%," if self.total else ""
        return f"{self.what}: {self.count:,}{of} {self.unit} ({share} {rate:,.0f} {self.unit}/s)".replace("( ", "(")
