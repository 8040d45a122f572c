"""Value checks for eval.model_args and eval.gen_kwargs keys whose bad values lm-eval, transformers or vLLM
would only trip over once the models are loaded (an assertion deep in scoring, a silent fallback to
another device, a generation that raises halfway through a task): judged here, in pre-flight, by rules
that hold on both backends."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _dtype(value: Any) -> bool:
    import torch

    return value == "auto" or (isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype))


# lm-eval's hf model uses these device names as given; any other it ignores silently (and picks one itself).
_DEVICE = re.compile(r"^(cpu|cuda|mps|mps:0|(cuda|npu|xpu|hpu):\d+)$")

Rule = tuple[Callable[[Any], bool], str]

MODEL_ARG_RULES: dict[str, Rule] = {
    "max_length": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "max_batch_size": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "max_model_len": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "max_num_seqs": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "tensor_parallel_size": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "data_parallel_size": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "gpu_memory_utilization": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "dtype": (_dtype, "'auto' or a torch dtype name (float16, bfloat16, float32)"),
    "softmax_dtype": (_dtype, "'auto' or a torch dtype name (float16, bfloat16, float32)"),
    "mixed_precision_dtype": (_dtype, "'auto' or a torch dtype name (float16, bfloat16, float32)"),
    "device": (lambda v: isinstance(v, str) and bool(_DEVICE.match(v)), "cpu, cuda[:N], mps, npu:N, xpu:N or hpu:N"),
}

GEN_KWARG_RULES: dict[str, Rule] = {
    "until": (_strings, "a string or a list of strings"),
    "stop": (_strings, "a string or a list of strings"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "top_k": (lambda v: _integer(v) and v >= -1, "an integer (0 or -1 = off)"),
    "num_beams": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a number > 0"),
    "presence_penalty": (_number, "a number"),
    "frequency_penalty": (_number, "a number"),
    "seed": (_integer, "an integer"),
    "min_new_tokens": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "min_tokens": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
}


def value_problem(rules: dict[str, Rule], key: str, value: Any) -> str | None:
    """Why `value` cannot be `key`'s value, or None (a key without a rule, or None: the library's default)."""
    rule = rules.get(key)
    if rule is None or value is None or rule[0](value):
        return None
    return f"{key} expects {rule[1]}, got {value!r}"
