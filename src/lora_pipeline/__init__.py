"""lora-pipeline: dataset -> LoRA training -> lm-eval -> model registry, in one command."""

__version__ = "0.1.0"
