"""The one stage table. The CLI subcommands, `pipeline.run`, run.json and the summary all loop over it.

Each stage is a plain function `entry(config_section, *upstream_dirs, out_dir) -> out_dir`: it reads only
its own config section, the output directories of its upstream stages (in table order) and writes one
output directory atomically. The entry is imported lazily, so the CLI starts without torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str  # CLI command and run-directory folder
    section: str  # the config section it reads
    upstream: tuple[str, ...]  # stages whose output directories it reads, in argument order
    entry: str  # "module:function"
    help: str

    def function(self) -> Callable[..., Path]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)

    def call(self, section_config: Any, inputs: dict[str, Path], out: Path) -> Path:
        return self.function()(section_config, *(inputs[up] for up in self.upstream), out)


STAGES: tuple[Stage, ...] = (
    Stage(
        "dataset",
        "dataset",
        (),
        "lora_pipeline.stages.dataset:prepare_dataset",
        "Fetch, read, validate and split the dataset (train.jsonl, eval.jsonl, dataset.json)",
    ),
    Stage(
        "train",
        "train",
        ("dataset",),
        "lora_pipeline.stages.train:train_adapter",
        "LoRA fine-tune on the dataset stage's output (adapter, metrics, loss chart)",
    ),
    Stage(
        "eval",
        "eval",
        ("train",),
        "lora_pipeline.stages.evaluate:evaluate_adapter",
        "lm-eval the base model and base+adapter from the train stage's output",
    ),
    Stage(
        "register",
        "registry",
        ("train", "eval"),
        "lora_pipeline.stages.register:register_adapter",
        "Register the train stage's adapter in the model registry (skipped when no address)",
    ),
)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
