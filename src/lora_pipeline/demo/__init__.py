"""Fully offline demo: a tiny random-init Qwen2 model, its own tokenizer, a training set and an lm-eval task.

``build_demo()`` materialises everything under ``$LORA_PIPELINE_HOME/demo`` (once; later calls are a
cache hit). The base model is random, so it scores at chance on the task; a short CPU LoRA fine-tune
on the shipped training data lifts it far above chance, which exercises the whole pipeline end to end
in about a minute with no network access.
"""

import copy
from typing import Any

from lora_pipeline.demo.build import DemoAssets, build_demo

# A config layer (section -> option -> value, the names of lora_pipeline.config) under which the demo
# learns reliably on CPU: measured with transformers.Trainer + PEFT on 90% of the rows, 4 seeds, held-out
# acc 0.92-0.945 vs 0.21 for the base, ~25 s of training on 2 cores. A random-init base needs a far
# higher learning rate than the usual 2e-4; the small batch gives it enough steps to get past the initial
# plateau at the class prior; LoRA dropout narrows the train/held-out gap (without it: 0.87-0.95).
DEMO_OVERRIDES: dict[str, dict[str, object]] = {
    "train": {
        "learning_rate": 3e-3,
        "epochs": 10,
        "effective_batch_size": 8,
        "micro_batch_size": 8,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.1,
        "lr_scheduler": "linear",
        "lr_warmup": 20,  # ~2% of the ~900 optimizer steps (720 rows after the 90% split)
        "max_seq_len": 128,
        "lora_load_in_4bit": False,
        "use_liger": False,
    },
    "eval": {"limit": -1, "batch_size": "8"},
}


def demo_config() -> dict[str, Any]:
    """The demo's config layer: built-in tiny model, demo data and eval task, CPU-friendly settings."""
    assets = build_demo()
    layer: dict[str, Any] = copy.deepcopy(DEMO_OVERRIDES)
    layer.setdefault("dataset", {})["data_uri"] = str(assets.data_file)
    layer.setdefault("train", {})["model"] = str(assets.model_dir)
    layer.setdefault("eval", {}).update(tasks=[assets.task_name], include_path=str(assets.task_dir))
    # The embedded local registry, so the demo shows registration end to end (`lora-pipeline models list`).
    # `auto`: a second demo on this machine (another clone or run directory) gets its own version.
    layer["registry"] = {"address": "local", "model_name": "demo-topic", "version": "auto"}
    return layer


__all__ = ["DEMO_OVERRIDES", "DemoAssets", "build_demo", "demo_config"]
