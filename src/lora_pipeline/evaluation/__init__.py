"""The eval stage's parts: option checks (checks.py), backends and their keys (backends.py), scoring with
lm-eval and the run's own split (scoring.py, split_task.py) and the side-by-side rows (results.py).
The stage entry is lora_pipeline.stages.evaluate.evaluate_adapter."""
