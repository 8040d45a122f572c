"""Progress without a terminal is a readable log line now and then, never a carriage-return bar."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, write_jsonl
from lora_pipeline.config import DatasetConfig
from lora_pipeline.progress import Meter, format_eta


def test_meter_logs_count_total_and_rate(caplog) -> None:
    logger = logging.getLogger("lora_pipeline.test")
    with caplog.at_level("INFO", logger="lora_pipeline"):
        meter = Meter(logger, "download x.jsonl", "B", total=3000, every_seconds=0)
        meter.update(1000)
        meter.update(2000)
        meter.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("download x.jsonl: 1,000 of 3,000 B (") and lines[-1].startswith(
        "download x.jsonl: 3,000"
    )
    assert all("\r" not in line for line in lines)


def test_dataset_stage_reports_rows_read(tmp_path: Path, caplog, monkeypatch) -> None:
    from lora_pipeline import progress
    from lora_pipeline.stages.dataset import prepare_dataset

    monkeypatch.setattr(progress.Meter.__init__, "__defaults__", (None, 0.0))  # every_seconds = 0
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS)
    with caplog.at_level("INFO", logger="lora_pipeline"):
        prepare_dataset(DatasetConfig(data_uri=str(data)), tmp_path / "ds")
    assert any(r.getMessage().startswith("dataset: d.jsonl: 40 rows (") for r in caplog.records)


def test_eta_format() -> None:
    assert (format_eta(31), format_eta(3725), format_eta(-5)) == ("0:31", "1:02:05", "0:00")


@pytest.mark.parametrize(
    ("final", "mean", "expected"),
    [
        (0.5, 1.3754, "final loss 0.5000 (mean over the run 1.3754)"),
        (0.5, None, "final loss 0.5000"),
        (None, None, "no loss logged"),
    ],
)
def test_the_summary_line_names_the_final_loss_and_labels_the_mean(final, mean, expected) -> None:
    from lora_pipeline.training.records import loss_summary

    assert loss_summary(final, mean) == expected


def test_on_a_terminal_progress_is_one_redrawn_line_that_log_lines_never_run_into() -> None:
    import io
    from types import SimpleNamespace

    from lora_pipeline.progress import TerminalLine
    from lora_pipeline.training.callbacks import ProgressLogCallback

    screen = io.StringIO()
    handler = logging.StreamHandler(screen)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    logger = logging.getLogger("lora_pipeline.test_tty")
    logger.setLevel(logging.INFO)
    try:
        live = TerminalLine(screen, min_interval=0)
        callback = ProgressLogCallback(100.0, logger, live=live)
        state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
        callback.on_train_begin(None, state, None)
        for step in range(1, 11):
            state.global_step = step
            callback.on_step_end(None, state, SimpleNamespace(should_log=True))
            callback.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-3})
            if step == 5:
                logger.info("train: expected time to finish: ~0:01 (from 4 steps)")
                callback.on_log(None, state, None, logs={"eval_loss": 0.5})
        callback.on_train_end(None, state, None)
    finally:
        root.removeHandler(handler)
    text = screen.getvalue()
    assert "{'loss'" not in text and "train: step 4/10 (40%) loss 0.2500 lr 1.0e-03" in text  # drawn in place
    visible = [line.rsplit(TerminalLine.CLEAR, 1)[-1] for line in text.split("\n")]
    # every finished line on screen is a whole log line: the bar was cleared before each one
    assert all(line.startswith("LOG ") for line in visible[:-1]), visible
    assert visible[-1] == ""  # and no bar is left behind
    (last,) = [line for line in visible if "train: step" in line]  # the final state stays, as a log line
    assert last.startswith("LOG train: step 10/10 (100%) loss 0.1000 lr 1.0e-03") and " tok/s ETA 0:00" in last
    assert "LOG train: eval loss 0.5000 at step 5/10" in visible
