"""The memory estimate before training, the time estimate after a few steps, and the measured peaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from helpers import train_config
from lora_pipeline.files import read_json
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.training.estimate import BACKWARD_WORKING_SET, PeakMemory, estimate_memory, format_bytes


def lora_model(demo_assets, quantization_config=None):
    kwargs = {"quantization_config": quantization_config, "device_map": "cpu"} if quantization_config else {}
    base = transformers.AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32, **kwargs)
    return get_peft_model(base, LoraConfig(r=8, target_modules="all-linear"))


def test_parts_add_up_and_grow_with_the_pass(demo_assets) -> None:
    model = lora_model(demo_assets)
    small, large = estimate_memory(model, 512), estimate_memory(model, 4096)
    assert all(v > 0 for v in small.values())
    assert small["total"] == sum(v for k, v in small.items() if k != "total")
    assert large["activations"] > 7 * small["activations"]  # about linear in the pass's tokens
    assert large["weights"] == small["weights"] and large["optimizer"] == 2 * small["lora"]
    # logits only where targets are predicted: fewer activations
    assert estimate_memory(model, 4096, target_tokens=100)["activations"] < large["activations"]
    assert format_bytes(3 * 1024**3) == "3.0 GiB" and format_bytes(512) == "512 B"


def test_activations_are_half_precision_on_cuda(demo_assets, monkeypatch) -> None:
    """peft keeps LoRA weights in fp32, but on CUDA training runs under bf16/fp16 autocast: 2-byte activations."""
    model = lora_model(demo_assets)
    assert next(p for p in model.parameters() if p.requires_grad).dtype == torch.float32
    on_cpu = estimate_memory(model, 1024, target_tokens=0)["activations"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_cuda = estimate_memory(model, 1024, target_tokens=0)["activations"]
    assert abs(on_cpu - 2 * on_cuda) <= 1


def test_4bit_weights_count_their_packed_size(demo_assets) -> None:
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    full, packed = estimate_memory(lora_model(demo_assets), 1024), estimate_memory(lora_model(demo_assets, bnb), 1024)
    assert packed["weights"] < 0.8 * full["weights"]
    assert packed["lora"] == full["lora"]


@pytest.mark.integration
def test_activation_estimate_matches_what_autograd_saves(demo_assets) -> None:
    """The estimate's per-token constant against the bytes autograd keeps for the backward of one pass."""
    model = lora_model(demo_assets)
    tokens = 1024
    ids = torch.randint(5, 700, (1, tokens))
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views of one tensor share it: count each storage once
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    estimate = estimate_memory(model, tokens)["activations"] / BACKWARD_WORKING_SET
    assert 0.6 < sum(saved.values()) / estimate < 1.4


@pytest.mark.integration
def test_training_records_estimates_and_peaks(demo_assets, demo_dataset, tmp_path: Path, caplog) -> None:
    cfg = train_config(demo_assets.model_dir)
    with caplog.at_level("INFO", logger="lora_pipeline"):
        metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "t") / "metrics.json")
    memory, timing = metrics["memory"], metrics["time"]
    assert memory["estimate"]["total"] > 0
    peak = memory["peak"]
    assert peak["rss_peak_bytes"] >= peak["rss_start_bytes"] > 0
    assert peak["cuda_max_allocated_bytes"] is None  # CPU
    assert (
        timing["estimate"]["after_steps"] == min(10, metrics["steps"] - 1)
        and timing["estimate"]["predicted_seconds"] > 0
    )
    assert timing["train_seconds"] == metrics["train_seconds"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("train: expected peak memory ~") for m in messages)
    assert any(m.startswith("train: expected time to finish: ~") for m in messages)


def test_peak_memory_catches_a_short_lived_allocation() -> None:
    """Freed again before any sampling could see it: the kernel's high-water mark still has it."""
    peak = PeakMemory(interval=60.0)
    block = bytearray(200 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    del block
    measured = peak.stop()
    assert measured["rss_peak_increase_bytes"] >= 150 * 2**20
