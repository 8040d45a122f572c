"""Shared by the training tests."""

from __future__ import annotations

import time
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


def use_offline_hub_cache(hub: Path, main: str, monkeypatch, tmp_path: Path) -> Path:
    """Point huggingface_hub (offline, as HF_HUB_OFFLINE=1 sets) at `hub`, a cache holding the dataset
    owner/name, whose `main` ref is the commit `main`; datasets' own cache goes under tmp_path."""
    refs = hub / "datasets--owner--name" / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / "main").write_text(main)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return hub


def run_compiled_pipeline_locally(compiled: Path, tmp_path: Path, use_venv: bool) -> tuple[Path, float]:
    """Run a compiled pipeline YAML with kfp.local's subprocess runner: its pipeline root and the seconds taken."""
    from kfp import components, local  # kfp only for the tests that run a compiled pipeline

    root = tmp_path / "kfp-root"
    local.init(
        runner=local.SubprocessRunner(use_venv=use_venv),
        pipeline_root=str(root),
        workspace_root=str(tmp_path / "kfp-workspace"),
        raise_on_error=True,
    )
    started = time.perf_counter()
    components.load_component_from_file(str(compiled))()  # the parameters' defaults come from -c
    return root, time.perf_counter() - started
