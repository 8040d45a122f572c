"""Progress of training and evaluation, the project's own: never HF's tqdm bars or raw logged dicts.

Without a terminal (CI, a pod's log): one log line about every tenth of the work or every `every_seconds`
seconds, whichever comes first, and at the end, e.g.
`train: step 40/900 (4%) loss 1.2345 lr 2.0e-04 9,500 tok/s ETA 0:31`, plus one line per evaluation.
On a terminal: the same text as one line redrawn in place (`TerminalLine`), cleared before any log line is
printed so that no line is glued onto it; the last state stays as a log line. The Trainer callback that
writes the train stage's lines is `training.callbacks.ProgressLogCallback`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO


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


class TerminalLine:
    """One status line on a terminal, redrawn in place. While shown, a filter on the logging handlers clears
    it before each record is written (the next draw puts it back below), so log lines never run into it."""

    CLEAR = "\r\x1b[K"

    def __init__(self, stream: IO[str] | None = None, min_interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.min_interval, self.last_draw, self.shown = min_interval, 0.0, False
        self._handlers: list[logging.Handler] = []
        self._filter = _ClearBeforeRecord(self)

    def draw(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < self.min_interval:
            return  # a redraw per step of a fast run would cost more than the step
        self.last_draw = now
        self._attach()
        self.stream.write(self.CLEAR + text)
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write(self.CLEAR)
            self.stream.flush()
            self.shown = False

    def close(self) -> None:
        self.clear()
        for handler in self._handlers:
            handler.removeFilter(self._filter)
        self._handlers = []

    def _attach(self) -> None:
        if self._handlers:
            return
        # the root's handlers, and transformers' own (its logger does not propagate)
        for name in ("", "transformers", "lm_eval"):
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(self._filter)
                self._handlers.append(handler)


class _ClearBeforeRecord(logging.Filter):
    def __init__(self, line: TerminalLine) -> None:
        super().__init__()
        self.line = line

    def filter(self, record: logging.LogRecord) -> bool:
        self.line.clear()
        return True


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


class WorkProgress:
    """Progress of `total` units of work (eval requests): without a terminal a log line about every tenth
    of the work (at most one per `min_seconds`, so that a short eval stays quiet) or every `every_seconds`,
    and a closing line when any was printed, e.g. `eval: tuned demo_topic 120/400 requests (30%) ETA 0:12`;
    on a terminal (`live`) the same text redrawn in place, and the closing line."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        total: int,
        unit: str = "requests",
        every_seconds: float = 30.0,
        min_seconds: float = 3.0,
        live: TerminalLine | None = None,
    ) -> None:
        self.logger, self.what, self.total, self.unit, self.live = logger, what, total, unit, live
        self.every_seconds, self.min_seconds = every_seconds, min_seconds
        self.done, self.next_share, self.lines = 0, 0.1, 0
        self.started = self.last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.live is not None:
            self.live.draw(self.text(now))
            return
        share = self.done / max(1, self.total)
        due = share >= self.next_share and now - self.last_line >= self.min_seconds
        if (due or now - self.last_line >= self.every_seconds) and self.done < self.total:
            self.next_share = (int(share * 10) + 1) / 10
            self.log(now)

    def close(self) -> None:
        now = time.monotonic()
        if self.live is not None:
            self.live.close()
        if self.lines or now - self.started >= self.min_seconds:  # a quick piece of work needs no line
            self.log(now)

    def log(self, now: float) -> None:
        self.last_line, self.lines = now, self.lines + 1
        self.logger.info("%s", self.text(now))

    def text(self, now: float) -> str:
        elapsed = now - self.started
        line = f"{self.what} {self.done:,}/{self.total:,} {self.unit} ({100 * self.done // max(1, self.total)}%)"
        if self.done >= self.total:
            return f"{line} in {format_eta(elapsed)}"
        if self.done and elapsed > 0:
            line += f" ETA {format_eta((self.total - self.done) * elapsed / self.done)}"
        return line
