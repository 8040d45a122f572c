"""Pre-flight checks that the base model's parts agree with each other and with the train options.

Seconds, no weights loaded: the config is parsed, the tokenizer loaded, the safetensors headers read, and
the model built on torch's meta device (shapes without memory). Each failure is one ConfigError naming the
field and the model's path, found before the dataset stage runs.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig
from lora_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

FIELD = "train.model"
# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone holds only settings).
VOCAB_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
VOCAB_SUFFIXES = (".tiktoken", ".model")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
DEFAULT_MAX_SEQ_LEN = 8192  # the spec's default: clamped to a shorter context, where an explicit value fails


def check_model_agrees(cfg: TrainConfig, path: Path) -> None:
    """A local model directory: known model_type, a tokenizer with a vocabulary that fits the embedding,
    weights whose names, shapes and dtypes match the config, and train options that fit the model.
    May lower `cfg.max_seq_len` from the spec's default to the model's context (one info line)."""
    model_config = _model_config(path, cfg.trust_remote_code)
    _check_tokenizer(path, model_config, cfg.trust_remote_code)
    model = _meta_model(path, model_config, cfg.trust_remote_code)
    quantized = getattr(model_config, "quantization_config", None) is not None
    if not quantized:  # packed quantized weights have shapes and dtypes of their own
        _check_weights(path, model)
    check_train_options(cfg, model_config, model, where=str(path))


def _model_config(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if not trust_remote_code and model_type not in CONFIG_MAPPING:
        raise ConfigError(
            f"{path}: model_type {str(model_type)[:60]!r} is not one transformers knows "
            "(a model with its own code needs --train.trust_remote_code true)",
            field=FIELD,
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad config.json
        raise ConfigError(f"{path}/config.json cannot be read by transformers: {_first(exc)}", field=FIELD) from None


def _check_tokenizer(path: Path, model_config: Any, trust_remote_code: bool) -> None:
    has_vocab = any((path / n).is_file() for n in VOCAB_FILES) or any(
        p.suffix in VOCAB_SUFFIXES for p in path.iterdir() if p.is_file()
    )
    if not has_vocab and not trust_remote_code:
        raise ConfigError(
            f"{path}: the tokenizer has no vocabulary file (expected one of {', '.join(VOCAB_FILES)})", field=FIELD
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # sentencepiece, tokenizers and transformers each raise their own types
        raise ConfigError(f"{path}: the tokenizer cannot be loaded: {_first(exc)}", field=FIELD) from None
    vocab_size = getattr(model_config, "vocab_size", None) or getattr(model_config.get_text_config(), "vocab_size", 0)
    if vocab_size and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_size} "
            "(config.json vocab_size): the tokenizer belongs to another model",
            field=FIELD,
        )


def _meta_model(path: Path, model_config: Any, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # an architecture that is not a causal LM, or a config its code rejects
        raise ConfigError(f"{path}: not buildable as a causal language model: {_first(exc)}", field=FIELD) from None


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """name -> {"dtype", "shape"} from a safetensors file's JSON header (its size was checked before)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _check_weights(path: Path, model: Any) -> None:
    stored: dict[str, dict[str, Any]] = {}
    for file in sorted(path.glob("*.safetensors")):
        stored.update(safetensors_header(file))
    if not stored:
        return  # .bin weights are pickles: not opened here
    expected = {name: t for name, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    matched: set[str] = set()
    for name, info in stored.items():
        key = name if name in expected else f"{prefix}.{name}" if f"{prefix}.{name}" in expected else None
        if key is None:
            continue  # transformers ignores unexpected tensors (buffers of older versions, for one)
        matched.add(key)
        want = list(expected[key].shape)
        if list(info.get("shape", [])) != want:
            raise ConfigError(
                f"{path}: weight {name} has shape {info.get('shape')} but config.json makes it {want}", field=FIELD
            )
        if expected[key].is_floating_point() and info.get("dtype") not in FLOAT_DTYPES:
            raise ConfigError(f"{path}: weight {name} is stored as {info.get('dtype')}, not a float type", field=FIELD)
    # Tensors transformers fills in itself when absent (tied output layers, buffers it recomputes).
    optional = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    tied = _tied_keys(model)
    missing = [k for k in expected if k not in matched and k not in tied and not any(p.search(k) for p in optional)]
    if missing:
        raise ConfigError(
            f"{path}: the weights lack {len(missing)} of the model's {len(expected)} tensors "
            f"(first: {missing[0]}): they do not belong to this config.json",
            field=FIELD,
        )


def _tied_keys(model: Any) -> set[str]:
    """Tensors shared with another (the output layer tied to the embedding): not stored twice."""
    declared = set(getattr(model, "_tied_weights_keys", None) or [])  # a dict or a list, by version
    if not getattr(model.config, "tie_word_embeddings", False):
        return declared
    shared = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    names = declared | shared
    output = model.get_output_embeddings()
    return names | {f"{n}.weight" for n, m in model.named_modules() if output is not None and m is output}


def check_train_options(cfg: TrainConfig, model_config: Any, model: Any, where: str) -> None:
    """lora_target_modules name modules of the model; lora_r fits the narrowest targeted layer; max_seq_len
    fits the model's context (the spec's default is lowered to it instead, with one line)."""
    from lora_pipeline.models import lora_targets

    widths = _target_widths(model, lora_targets(cfg))
    narrowest = min(widths.values())
    if cfg.lora_r > narrowest:
        layer = min(widths, key=widths.__getitem__)
        raise ConfigError(
            f"rank {cfg.lora_r} is above the width of the targeted layer {layer} ({narrowest}) of {where}: "
            f"a rank above a layer's width adds parameters and no capacity; use at most {narrowest}",
            field="train.lora_r",
        )
    context = next(
        (getattr(model_config, k) for k in CONTEXT_KEYS if isinstance(getattr(model_config, k, None), int)), 0
    )
    if context and cfg.max_seq_len > context:
        if cfg.max_seq_len != DEFAULT_MAX_SEQ_LEN:
            raise ConfigError(
                f"{cfg.max_seq_len} tokens is beyond the context of {where} ({context}, config.json); "
                f"use at most {context}",
                field="train.max_seq_len",
            )
        log.info("train.max_seq_len: the default %d is beyond the model's context; using %d", cfg.max_seq_len, context)
        cfg.max_seq_len = context


def _target_widths(model: Any, targets: list[str]) -> dict[str, int]:
    """Targeted layer name -> its width (the smaller side of its weight), as peft matches names: a module
    whose name is the entry or ends with '.' + entry. Empty targets: every linear layer but the output."""
    import torch

    output = model.get_output_embeddings()
    layers = {
        name: m
        for name, m in model.named_modules()
        if getattr(getattr(m, "weight", None), "ndim", 0) == 2 and not isinstance(m, torch.nn.Embedding)
    }
    if not targets:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, which peft's all-linear includes

        linear = (torch.nn.Linear, Conv1D)
        chosen = {n: m for n, m in layers.items() if isinstance(m, linear) and m is not output}
    else:
        chosen = {}
        for target in targets:
            found = {n: m for n, m in model.named_modules() if n == target or n.endswith(f".{target}")}
            if not found:
                known = sorted({n.rsplit(".", 1)[-1] for n in layers})
                raise ConfigError(
                    f"no module named {target!r} in the model (its layers: {', '.join(known[:20])})",
                    field="train.lora_target_modules",
                )
            chosen.update(found)
    widths = {n: min(m.weight.shape) for n, m in chosen.items() if getattr(getattr(m, "weight", None), "ndim", 0) == 2}
    return widths or {"(none)": 1 << 62}


def _first(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
