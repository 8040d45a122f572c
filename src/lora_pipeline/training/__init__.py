"""The trainer's parts: the token-budget Trainer and its batching, padding-free packing, the fused LoRA forward,
backends (unsloth, Liger), the TrainingArguments mapping, checkpoints, progress callbacks, memory and time
estimates, CPU settings, several processes (torchrun) and the run's records (metrics.json).

`stages/train.py` is the recipe that puts them together; `models.py` and `tokenization.py` are shared with eval.
"""
