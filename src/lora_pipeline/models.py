"""The base model: where it is, how it is quantized, and loading it the same way for training and eval.

The train stage records `quantization_settings(cfg)` and `trust_remote_code` in its metrics.json, and
the eval stage loads the base with the same settings, so a QLoRA adapter is scored on the quantized
base it was trained on.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig, is_local_uri, local_path
from lora_pipeline.errors import StageError, one_line


def resolve_model(model: str, fetch: bool = False) -> str:
    """A local model path becomes absolute (the adapter records it as its base); a hub id stays as is; an
    s3:// prefix or an oci:// image becomes its local copy in the model cache (downloaded when `fetch`, reused
    by content)."""
    from lora_pipeline import sources

    if model.startswith(sources.MODEL_SCHEMES):
        if not fetch:
            return model

        return str(sources.fetch_model(model, model_cache_dir()).resolve())
    path = Path(local_path(model))
    if is_local_uri(model) and (path.exists() or model.startswith((".", "/", "~", "file://"))):
        if not (path / "config.json").exists():
            raise StageError(f"no model (config.json) at {path}", field="train.model")
        return str(path.resolve())
    return model


def recorded_base(base_ref: str, source: object) -> str:
    """The base an adapter was trained on: its recorded path, or, where that is not here (an eval pod is not the
    train pod), the s3:// or oci:// model it was fetched from (`source`, metrics.json's base_model_uri), fetched
    again into this machine's cache: the same content, as the cache is keyed by ETags or manifest digest."""
    from lora_pipeline import sources

    if isinstance(source, str) and source.startswith(sources.MODEL_SCHEMES) and not Path(base_ref).is_dir():
        return resolve_model(source, fetch=True)
    return base_ref


def model_cache_dir() -> Path:
    """Where models fetched from s3:// and oci:// are kept ($LORA_PIPELINE_HOME/models, default
    ~/.cache/lora-pipeline)."""
    home = os.environ.get("LORA_PIPELINE_HOME") or Path.home() / ".cache" / "lora-pipeline"
    return Path(home) / "models"


def quantization_settings(cfg: TrainConfig) -> dict[str, Any] | None:
    """The bitsandbytes settings the base is loaded with, as plain JSON (None = full precision)."""
    if cfg.lora_load_in_4bit:
        return {
            "bits": 4,
            "quant_type": cfg.bnb_4bit_quant_type or "nf4",
            "compute_dtype": cfg.bnb_4bit_compute_dtype or "bfloat16",
            "double_quant": True if cfg.bnb_4bit_use_double_quant is None else cfg.bnb_4bit_use_double_quant,
        }
    if cfg.lora_load_in_8bit:
        return {"bits": 8}
    return None


def check_quantization_available(quant: dict[str, Any] | None, field: str = "train.lora_load_in_4bit") -> None:
    if quant and importlib.util.find_spec("bitsandbytes") is None:
        raise StageError(f"QLoRA needs bitsandbytes (pip install bitsandbytes), or set --{field} false", field=field)


def _bnb_config(quant: dict[str, Any]) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if quant["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["quant_type"],
        bnb_4bit_compute_dtype=getattr(torch, quant["compute_dtype"]),
        bnb_4bit_use_double_quant=quant["double_quant"],
    )


def load_base_model(
    model_ref: str, quant: dict[str, Any] | None, trust_remote_code: bool = False, field: str = "train.model"
) -> Any:
    """The base causal LM on this process's device, quantized as `quant` says (see quantization_settings)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_local_model_there(model_ref, field)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    else:
        kwargs["dtype"] = torch.float32
        if quant:
            kwargs["device_map"] = "cpu"  # bitsandbytes quantizes on load only when told the device
    if quant:
        kwargs["quantization_config"] = _bnb_config(quant)
    try:
        return AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except OSError as exc:
        raise StageError(f"cannot load model {model_ref!r}: {first_line(exc)}", field=field) from None


def keep_cpu_4bit_weights_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during the per-epoch eval.

    On a CPU with AVX512-BF16, a Linear4bit in eval mode under no_grad converts its weight in place to an
    inference-only layout, and the next training step then fails ("a view of a leaf Variable that requires
    grad is being used in an in-place operation"). Training keeps the trainable layout throughout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(model_ref: str, trust_remote_code: bool = False, field: str = "train.model") -> Any:
    from transformers import AutoTokenizer

    check_local_model_there(model_ref, field)
    try:
        return AutoTokenizer.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # ValueError: a folder without tokenizer files transformers can read
        raise StageError(f"cannot load the tokenizer of {model_ref!r}: {first_line(exc)}", field=field) from None


def check_local_model_there(model_ref: str, field: str) -> None:
    """A model named by a path (an adapter records its base's path as trained) is there: else transformers
    takes the path for a Hub repo id and answers that it is not a valid one."""
    if (
        model_ref.startswith(("/", "./", "../", "~", "file://"))
        and not Path(local_path(model_ref)).expanduser().exists()
    ):
        raise StageError(f"no model at {model_ref} (moved or deleted since the adapter was trained?)", field=field)


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def lora_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The LoRA options, as peft's LoraConfig and unsloth's get_peft_model both name them."""
    return {
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "use_rslora": cfg.lora_use_rslora,
        "use_dora": cfg.lora_use_dora,
    }


def lora_targets(cfg: TrainConfig) -> list[str]:
    """`lora_target_modules` as a list; empty means every linear layer but the output layer."""
    return [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]


def wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    settings = lora_settings(cfg)
    lora = LoraConfig(**settings, target_modules=lora_targets(cfg) or "all-linear", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # peft asks the model for transformers' deprecated `is_gradient_checkpointing`: not the user's doing.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as exc:  # peft names the modules it could not find
        raise StageError(first_line(exc), field="train.lora_target_modules") from None


def adapter_base(adapter: Path, field: str) -> str:
    """The base model an adapter directory names, after checking that its files load: a truncated or
    hand-edited adapter_config.json or weights file is one line naming the file, not an error inside peft."""
    import json

    config_file = adapter / "adapter_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StageError(f"{config_file}: not a readable adapter config ({type(exc).__name__})", field=field) from None
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise StageError(f"{config_file}: no base_model_name_or_path", field=field)
    weights = adapter / "adapter_model.safetensors"
    if weights.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as fh:
                fh.keys()  # reads the header only: the tensors load later
        except Exception as exc:  # safetensors' own error type, OSError, ...: all say the file is unusable
            raise StageError(
                f"{weights}: not a readable safetensors file ({one_line(str(exc), 120)})", field=field
            ) from None
    return base
