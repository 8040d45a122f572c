"""Shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from lora_pipeline.config import TrainConfig


def train_config(model_dir: Path, **overrides) -> TrainConfig:
    """Seconds of training on the demo model: fp32, one epoch, 8 rows a step, one thread."""
    values = dict(
        model=str(model_dir),
        effective_batch_size=8,
        epochs=1,
        learning_rate=5e-3,
        max_seq_len=128,
        lora_load_in_4bit=False,
        use_liger=False,
        threads=1,
    )
    return TrainConfig(**(values | overrides))
