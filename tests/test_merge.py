"""`train.merge`: merged/ is a plain transformers model that gives the adapter's outputs without peft."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import train_config
from lora_pipeline.files import read_json
from lora_pipeline.stages.train import train_adapter


def train(demo_assets, dataset: Path, out: Path, **overrides) -> Path:
    return train_adapter(train_config(demo_assets.model_dir, **overrides), dataset, out)


def adapter_logits(demo_assets, trained: Path, ids: torch.Tensor) -> torch.Tensor:
    """The adapter on the full-precision base, through peft: what the merged model must reproduce."""
    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained / "adapter").eval()
    lora_b = [w for name, w in load_file(trained / "adapter" / "adapter_model.safetensors").items() if "lora_B" in name]
    assert max(float(w.abs().max()) for w in lora_b) > 0  # trained: the adapter changes the outputs
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.integration
@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "trained-in-4bit"])
def test_merged_model_reproduces_the_adapter(demo_assets, demo_dataset, tmp_path, quantized) -> None:
    trained = train(demo_assets, demo_dataset, tmp_path / "t", merge=True, lora_load_in_4bit=quantized)
    merged_dir = trained / "merged"
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "config.json").exists()
    assert (merged_dir / "tokenizer_config.json").exists()
    assert not (merged_dir / "adapter_config.json").exists()  # a plain model, no peft needed
    assert (trained / "adapter" / "adapter_model.safetensors").exists()  # the adapter is kept
    assert read_json(trained / "metrics.json")["merged"] is True
    ids = torch.randint(5, 700, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32  # full precision even when training was 4-bit
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    expected = adapter_logits(demo_assets, trained, ids)
    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-3)
    assert torch.allclose(merged_logits, expected, atol=1e-4), (merged_logits - expected).abs().max()


@pytest.mark.integration
def test_no_merged_dir_unless_asked(demo_assets, demo_dataset, tmp_path) -> None:
    trained = train(demo_assets, demo_dataset, tmp_path / "t")
    assert not (trained / "merged").exists()
    assert read_json(trained / "metrics.json")["merged"] is False


@pytest.mark.integration
def test_cli_offers_the_merge_option() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "--train.merge" in out.stdout
