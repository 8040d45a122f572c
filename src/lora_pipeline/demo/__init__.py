"""Fully offline demo: a tiny random-init Qwen2 model, its own tokenizer, a training set and an lm-eval task.

``build_demo()`` materialises everything under ``$LORA_PIPELINE_HOME/demo`` (once; later calls are a
cache hit). The base model is random, so it scores at chance on the task; a short CPU LoRA fine-tune
on the shipped training data lifts it far above chance, which exercises the whole pipeline end to end
in about a minute with no network access.
"""

from lora_pipeline.demo.build import DemoAssets, build_demo

# Training/eval settings under which the demo learns reliably on CPU (measured: see tests/test_demo.py
# and the module docstring of build.py). A random-init model needs a much higher learning rate than
# the usual 1e-4/2e-4 used for pretrained models.
DEMO_OVERRIDES: dict[str, dict[str, object]] = {
    "train": {
        "learning_rate": 3e-3,
        "epochs": 8,
        "effective_batch_size": 8,
        "micro_batch_size": 8,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lr_scheduler": "linear",
        "lr_warmup": 20,  # ~3% of the 720 optimizer steps
        "max_seq_len": 128,
        "lora_load_in_4bit": False,
        "use_liger": False,
    },
    "eval": {"limit": -1, "batch_size": "8"},
}

__all__ = ["DEMO_OVERRIDES", "DemoAssets", "build_demo"]
