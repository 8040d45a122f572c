"""Training backends: what `train.backend` and `train.use_liger` pick, and that metrics.json says what ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import train_config
from lora_pipeline.config import TrainConfig
from lora_pipeline.files import read_json
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.training import backends


def test_auto_and_peft_pick_peft_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    assert backends.choose_backend(TrainConfig(backend="auto")) == "peft"
    assert backends.choose_backend(TrainConfig(backend="peft")) == "peft"


def test_unsloth_without_cuda_says_so_and_uses_peft(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        assert backends.choose_backend(TrainConfig(backend="unsloth")) == "peft"
    assert any("train.backend unsloth: no CUDA device" in r.getMessage() for r in caplog.records)


def test_auto_picks_unsloth_where_it_imports_on_cuda(monkeypatch) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "unsloth_importable", lambda: True)
    assert backends.choose_backend(TrainConfig(backend="auto")) == "unsloth"
    assert backends.choose_backend(TrainConfig(backend="peft")) == "peft"  # asked for: kept
    monkeypatch.setattr(backends, "unsloth_importable", lambda: False)
    assert backends.choose_backend(TrainConfig(backend="auto")) == "peft"


def test_liger_needs_cuda_and_the_package(monkeypatch, caplog) -> None:
    monkeypatch.setattr(backends, "cuda_available", lambda: False)
    with caplog.at_level("INFO", logger="lora_pipeline"):
        assert not backends.liger_available(TrainConfig(use_liger=True))
    assert any("Liger kernels need CUDA" in r.getMessage() for r in caplog.records)
    assert not backends.liger_available(TrainConfig(use_liger=False))


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.skipif(not backends.cuda_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["peft", "unsloth"])
def test_cuda_backends_train_and_say_what_ran(backend, demo_assets, demo_dataset, tmp_path: Path) -> None:
    if backend == "unsloth" and not backends.unsloth_importable():
        pytest.skip("unsloth is not installed")
    cfg = TrainConfig(model=str(demo_assets.model_dir), backend=backend, effective_batch_size=8, epochs=1)
    metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "train") / "metrics.json")
    assert metrics["backend"] == backend and metrics["device"] == "cuda"
    assert (tmp_path / "train" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.integration
def test_fsdp_strategy_is_named_as_not_applied(demo_assets, demo_dataset, tmp_path: Path, caplog) -> None:
    cfg = train_config(demo_assets.model_dir, fsdp_sharding_strategy="FULL_SHARD")
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        train_adapter(cfg, demo_dataset, tmp_path / "train")
    warned = [r.getMessage() for r in caplog.records if "fsdp_sharding_strategy" in r.getMessage()]
    assert warned == ["train.fsdp_sharding_strategy FULL_SHARD: not applied; this run has one process"]
