"""Train stage on the tiny demo model: a standard PEFT adapter that changed, on a base that did not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_pipeline.config import DatasetConfig, TrainConfig
from lora_pipeline.errors import StageError
from lora_pipeline.files import read_json
from lora_pipeline.stages.dataset import prepare_dataset
from lora_pipeline.stages.train import batch_geometry, train_adapter

pytestmark = pytest.mark.integration


def small_train_config(model_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model_dir),
        effective_batch_size=8,
        micro_batch_size=4,
        epochs=1,
        learning_rate=5e-3,
        max_seq_len=128,
        lora_load_in_4bit=False,
        use_liger=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def demo_dataset(demo_assets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "dataset"
    return prepare_dataset(DatasetConfig(data_uri=str(demo_assets.data_file), subset=96, data_split=0.75), out)


@pytest.fixture(scope="module")
def trained(demo_assets, demo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "train"
    return train_adapter(small_train_config(demo_assets.model_dir, save_epoch=True), demo_dataset, out)


def test_outputs(trained: Path) -> None:
    assert (trained / "adapter" / "adapter_model.safetensors").exists()
    assert (trained / "adapter" / "tokenizer_config.json").exists()
    assert (trained / "loss_chart.html").read_text().count("<svg") >= 1
    assert list((trained / "checkpoints").glob("checkpoint-*")), "save_epoch keeps a checkpoint per epoch"
    metrics = read_json(trained / "metrics.json")
    assert metrics["steps"] == 9  # 72 train rows / effective batch 8, one epoch
    assert (metrics["micro_batch_size"], metrics["gradient_accumulation_steps"]) == (4, 2)
    assert metrics["eval_loss"] is not None
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 9 and all(loss > 0 for loss in losses)
    assert metrics["backend"] == "peft" and metrics["device"] == "cpu"
    assert not [p for p in trained.parent.iterdir() if p.name.startswith(".")]  # work/temp dirs cleaned


def test_adapter_config_names_base_and_targets_all_linear(trained: Path, demo_assets) -> None:
    cfg = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(demo_assets.model_dir).resolve())
    names = {name.split(".")[-1] for name in cfg["target_modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    assert (cfg["r"], cfg["lora_alpha"]) == (16, 32)


def test_adapter_loads_with_plain_peft_and_generates(trained: Path, demo_assets) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, trained / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(trained / "adapter")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which category: The cat slept."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # LoRA B matrices start at zero: non-zero now means training moved them.
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    # The base weights on disk are untouched by training.
    fresh = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir).state_dict()
    assert all(torch.equal(fresh[k], reference[k]) for k in reference)


def test_seed_makes_training_repeatable(demo_assets, demo_dataset, tmp_path: Path) -> None:
    cfg = small_train_config(demo_assets.model_dir, effective_batch_size=16, micro_batch_size=16)
    a = read_json(train_adapter(cfg, demo_dataset, tmp_path / "a") / "metrics.json")
    b = read_json(train_adapter(cfg, demo_dataset, tmp_path / "b") / "metrics.json")
    assert [h.get("loss") for h in a["history"]] == [h.get("loss") for h in b["history"]]


def test_4bit_qlora_runs_on_cpu(demo_assets, demo_dataset, tmp_path: Path) -> None:
    cfg = small_train_config(
        demo_assets.model_dir, effective_batch_size=24, micro_batch_size=24, lora_load_in_4bit=True, lora_r=4
    )
    metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "q") / "metrics.json")
    assert metrics["quantization"]["bits"] == 4 and metrics["steps"] == 3


def test_unknown_target_module_names_the_field(demo_assets, demo_dataset, tmp_path: Path) -> None:
    cfg = small_train_config(demo_assets.model_dir, lora_target_modules="no_such_proj")
    with pytest.raises(StageError) as err:
        train_adapter(cfg, demo_dataset, tmp_path / "t")
    assert err.value.field == "train.lora_target_modules"
    assert not (tmp_path / "t").exists()


def test_missing_model_names_the_field(demo_dataset, tmp_path: Path) -> None:
    with pytest.raises(StageError) as err:
        train_adapter(small_train_config(tmp_path / "nowhere"), demo_dataset, tmp_path / "t")
    assert err.value.field == "train.model"


@pytest.mark.parametrize(
    ("effective", "micro", "tokens", "longest", "world", "expected"),
    [
        (128, 0, 32000, 1000, 1, (32, 4)),  # token budget: 32 rows of 1000 tokens per micro-batch
        (128, 8, 32000, 1000, 1, (8, 16)),
        (16, 0, 32000, 100, 1, (16, 1)),  # budget allows more than the batch: no accumulation
        (128, 0, 32000, 1000, 2, (32, 2)),  # two ranks share the effective batch
        (10, 4, 32000, 10, 1, (4, 3)),  # not divisible: rounded up to 12 samples per step
    ],
)
def test_batch_geometry(effective, micro, tokens, longest, world, expected) -> None:
    cfg = TrainConfig(effective_batch_size=effective, micro_batch_size=micro, max_tokens_per_gpu=tokens)
    assert batch_geometry(cfg, longest, world) == expected
