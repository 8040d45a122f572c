"""The trainer's parts: token-budget batching, padding-free packing, the fused LoRA forward, backends (unsloth,
Liger), checkpoints, memory and time estimates, CPU settings, and several processes through torchrun.

`stages/train.py` is the recipe that puts them together; `models.py` and `tokenization.py` are shared with eval.
"""
