"""Which lm-eval model backend scores the run (hf or vllm), and which option keys each one takes.

Key checks happen before any model loads: an unknown key is otherwise a TypeError deep inside
from_pretrained, vLLM's engine or `generate`, minutes into a run. lm-eval's vllm module imports vllm at
module level, so its arguments are read from the module's source (ast) rather than imported: the checks
work on a CPU machine without vllm, where the vLLM arguments are built and validated in tests.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any

from lora_pipeline.errors import StageError

# HFLM arguments the stage sets itself from the train stage's output or from other options.
HF_PIPELINE_ARGS = {
    "pretrained": "the base model comes from the train stage's adapter",
    "peft": "the adapter comes from the train stage",
    "backend": "the base is scored as the causal LM it was trained as",
    "delta": "the adapter comes from the train stage",
    "tokenizer": "the adapter's tokenizer (and chat template) is used, as in training",
    "use_fast_tokenizer": "the adapter's tokenizer is used as saved by training",
    "batch_size": "set it with eval.batch_size",
    "trust_remote_code": "set it with train.trust_remote_code (eval loads the base as training did)",
}
# The same for lm-eval's vllm model.
VLLM_PIPELINE_ARGS = {
    "pretrained": "the base model comes from the train stage's adapter",
    "lora_local_path": "the adapter comes from the train stage",
    "max_lora_rank": "set from the adapter's rank",
    "tokenizer": "the adapter's tokenizer (and chat template) is used, as in training",
    "batch_size": "set it with eval.batch_size",
    "trust_remote_code": "set it with train.trust_remote_code",
    "quantization": "set from how training loaded the base",
}
# from_pretrained options that HFLM passes through (its **kwargs) when it loads the model itself.
FROM_PRETRAINED_ARGS = frozenset(
    {
        "attn_implementation",
        "low_cpu_mem_usage",
        "device_map",
        "max_memory",
        "offload_state_dict",
        "offload_buffers",
        "cache_dir",
        "local_files_only",
        "token",
        "use_safetensors",
        "variant",
    }
)
# HFLM arguments that still act on a model handed to it already loaded (read from HFLM.__init__ in
# lm-eval 0.4.13); the others only shape how HFLM loads a model itself.
HF_RUNTIME_ARGS = frozenset(
    {
        "backend",
        "truncation",
        "logits_cache",
        "max_length",
        "softmax_dtype",
        "mixed_precision_dtype",
        "max_batch_size",
        "add_bos_token",
        "prefix_token_id",
        "think_end_token",
        "enable_thinking",
        "chat_template_args",
    }
)
# vLLM engine arguments (vllm.engine.arg_utils.EngineArgs) that lm-eval's vllm model passes through its
# **kwargs; used when vllm is not importable here. With vllm installed, EngineArgs' own fields are used.
VLLM_ENGINE_ARGS = frozenset(
    {
        "gpu_memory_utilization",
        "enforce_eager",
        "max_num_seqs",
        "max_num_batched_tokens",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "kv_cache_dtype",
        "cpu_offload_gb",
        "swap_space",
        "block_size",
        "distributed_executor_backend",
        "pipeline_parallel_size",
        "download_dir",
        "load_format",
        "max_loras",
        "max_cpu_loras",
        "fully_sharded_loras",
        "disable_custom_all_reduce",
        "hf_overrides",
        "enable_expert_parallel",
    }
)
# Generation keys lm-eval itself reads on every backend (lm_eval.models.utils.normalize_gen_kwargs).
LM_EVAL_GEN_KEYS = frozenset(
    {"until", "do_sample", "temperature", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"}
)
# Names lm-eval accepts for the number of tokens to generate, in its order of priority.
MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
# vllm.SamplingParams fields, used when vllm is not importable here.
VLLM_SAMPLING_KEYS = frozenset(
    {
        "n",
        "best_of",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "stop",
        "stop_token_ids",
        "bad_words",
        "ignore_eos",
        "min_tokens",
        "logprobs",
        "prompt_logprobs",
        "detokenize",
        "skip_special_tokens",
        "spaces_between_special_tokens",
        "include_stop_str_in_output",
        "truncate_prompt_tokens",
        "logit_bias",
        "allowed_token_ids",
    }
)
# LoRA ranks vLLM's engine accepts for max_lora_rank.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """'hf' or 'vllm': auto means vllm when CUDA and the vllm package are both there, else hf."""
    if name != "auto":
        return name
    return "vllm" if vllm_importable() and cuda_available() else "hf"


def vllm_missing() -> str | None:
    """Why the vllm backend cannot run on this machine, or None."""
    missing = [what for what, ok in (("CUDA", cuda_available), ("the vllm package", vllm_importable)) if not ok()]
    return " and ".join(missing) or None


# --- option keys per backend -----------------------------------------------------------------------------


def model_arg_problem(key: str, backend: str) -> str | None:
    """Why `key` cannot be an eval.model_args key on `backend`, or None when it can."""
    pipeline = HF_PIPELINE_ARGS if backend == "hf" else VLLM_PIPELINE_ARGS
    if key in pipeline:
        return f"{key!r} cannot be set here: {pipeline[key]}"
    allowed = _hf_model_keys() if backend == "hf" else _vllm_model_keys()
    if key in allowed - set(pipeline):
        return None
    other = "vllm" if backend == "hf" else "hf"
    other_keys = _vllm_model_keys() if backend == "hf" else _hf_model_keys()
    if key in other_keys:
        return f"{key!r} is an option of the {other} backend only, and eval.backend resolves to {backend}"
    return f"unknown key {key!r} for the {backend} backend{_did_you_mean(key, allowed)}"


_SIMPLE_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


def model_arg_value_problem(key: str, value: Any, backend: str) -> str | None:
    """Why `value` cannot be the hf model's `key` argument (`max_length=abc`), judged by the type lm-eval's
    HFLM declares for it; None when it fits, or when the declared type is not a plain one to judge by."""
    if backend != "hf" or value is None:
        return None
    import inspect

    from lm_eval.models.huggingface import HFLM

    param = inspect.signature(HFLM.__init__).parameters.get(key)
    annotation = getattr(param, "annotation", inspect.Parameter.empty)
    if not isinstance(annotation, str):
        return None
    parts = {p.strip() for p in annotation.split("|")} - {"None"}
    if not parts or not parts <= set(_SIMPLE_TYPES):
        return None
    fits = any(isinstance(value, _SIMPLE_TYPES[p]) and (p == "bool" or not isinstance(value, bool)) for p in parts)
    return None if fits else f"{key} expects {' or '.join(sorted(parts))}, got {value!r}"


def gen_kwarg_problem(key: str, backend: str) -> str | None:
    """Why `key` cannot be an eval.gen_kwargs key on `backend`, or None when it can."""
    allowed = LM_EVAL_GEN_KEYS | (_hf_gen_keys() if backend == "hf" else _vllm_gen_keys())
    if key in allowed:
        return None
    other = "vllm" if backend == "hf" else "hf"
    if key in (_vllm_gen_keys() if backend == "hf" else _hf_gen_keys()):
        return f"{key!r} is a generation option of the {other} backend only, and eval.backend resolves to {backend}"
    return f"unknown generation key {key!r} for the {backend} backend{_did_you_mean(key, allowed)}"


def hf_gen_kwargs(gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """gen_kwargs for lm-eval's hf model: the spec's `max_tokens` (vLLM's name) is HF's `max_gen_toks`."""
    out = dict(gen_kwargs)
    if "max_tokens" in out:
        value = out.pop("max_tokens")
        out.setdefault("max_gen_toks", value)
    return out


def _did_you_mean(key: str, allowed: frozenset[str] | set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _hf_model_keys() -> frozenset[str]:
    import inspect

    from lm_eval.models.huggingface import HFLM

    return frozenset(set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}) | FROM_PRETRAINED_ARGS


@functools.cache
def _vllm_model_keys() -> frozenset[str]:
    """lm-eval's VLLM.__init__ parameters, read from its source, and vLLM's engine arguments."""
    spec = importlib.util.find_spec("lm_eval.models.vllm_causallms")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    init = next(
        node
        for cls in tree.body
        if isinstance(cls, ast.ClassDef) and cls.name == "VLLM"
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__init__"
    )
    params = {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}
    engine = VLLM_ENGINE_ARGS
    if vllm_importable():
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        engine = frozenset(f.name for f in dataclasses.fields(EngineArgs))
    return frozenset(params) | engine


@functools.cache
def _hf_gen_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    return frozenset(k for k in GenerationConfig().to_dict() if not k.startswith("_"))


@functools.cache
def _vllm_gen_keys() -> frozenset[str]:
    if vllm_importable():
        import inspect

        from vllm import SamplingParams

        return frozenset(inspect.signature(SamplingParams).parameters) | VLLM_SAMPLING_KEYS
    return VLLM_SAMPLING_KEYS


# --- the vllm model's arguments --------------------------------------------------------------------------


def vllm_model_args(
    base_ref: str,
    adapter: Path,
    quant: dict[str, Any] | None,
    model_args: dict[str, Any],
    batch_size: Any,
    trust_remote_code: bool,
) -> dict[str, Any]:
    """Arguments of lm-eval's vllm model: the base with the adapter as a LoRA request (unmerged, as in the
    hf path), the adapter's tokenizer, the user's model_args on top. The base is quantized as in training."""
    adapter_cfg = _read_adapter_config(adapter)
    rank = max([int(adapter_cfg.get("r") or 8), *map(int, (adapter_cfg.get("rank_pattern") or {}).values())])
    supported = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not supported:
        raise StageError(
            f"vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; the adapter has {rank}", field="eval.backend"
        )
    if adapter_cfg.get("use_dora"):
        raise StageError("vLLM does not serve DoRA adapters: use --eval.backend hf", field="eval.backend")
    args: dict[str, Any] = {
        "pretrained": base_ref,
        "tokenizer": str(adapter),
        "lora_local_path": str(adapter),
        "max_lora_rank": supported[0],
        "batch_size": batch_size,
        "trust_remote_code": trust_remote_code,
    }
    if quant:
        # vLLM quantizes a full-precision checkpoint on load with bitsandbytes, 4-bit only.
        if quant.get("bits") != 4:
            raise StageError(
                f"the adapter was trained on a {quant.get('bits')}-bit base, which vLLM cannot load: "
                "use --eval.backend hf",
                field="eval.backend",
            )
        args["quantization"] = "bitsandbytes"
    return {**args, **model_args}


def _read_adapter_config(adapter: Path) -> dict[str, Any]:
    import json

    return json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))


def vllm_model_class() -> Any:
    """lm-eval's vllm model class (imports vllm)."""
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM
