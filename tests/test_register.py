"""Register stage: skipped without an address, and the record says what would be registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_pipeline.config import RegistryConfig
from lora_pipeline.errors import RegistryError
from lora_pipeline.files import read_json
from lora_pipeline.stages.register import register_adapter


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    adapter = tmp_path / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "/models/base", "r": 8, "lora_alpha": 16})
    )
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"train_loss": 0.5, "eval_loss": 0.6}))
    (tmp_path / "eval").mkdir()
    comparison = [{"task": "demo_topic", "metric": "acc", "tuned": 0.9, "base": 0.2}]
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps({"comparison": comparison}))
    return tmp_path


def test_empty_address_skips_and_records(run_dir: Path) -> None:
    out = register_adapter(RegistryConfig(), run_dir / "train", run_dir / "eval", run_dir / "register")
    record = read_json(out / "registration.json")
    assert record["status"] == "skipped"
    assert (record["model_name"], record["version"], record["author"]) == ("lora-model", "1.0.0", "pipeline")
    assert record["uri"] == str((run_dir / "train" / "adapter").resolve())
    assert record["metadata"] == {
        "base_model": "/models/base",
        "lora_r": 8,
        "lora_alpha": 16,
        "train_loss": 0.5,
        "eval_loss": 0.6,
        "eval_demo_topic_acc": 0.9,
    }


def test_address_without_client_is_one_clear_error(run_dir: Path) -> None:
    with pytest.raises(RegistryError) as err:
        register_adapter(RegistryConfig(address="registry.local"), run_dir / "train", None, run_dir / "register")
    assert err.value.field == "registry.address"
    assert not (run_dir / "register").exists()
