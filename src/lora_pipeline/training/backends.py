"""Which training backend runs, and the CUDA-only pieces: unsloth's model loading and Liger's kernels.

`train.backend`:
  auto     unsloth when CUDA is present and `unsloth` imports, else transformers + peft
  peft     transformers + peft everywhere
  unsloth  unsloth; without CUDA or the package, one line saying so and transformers + peft instead

Either way the result is a standard PEFT adapter and the same Trainer loop (token-budget steps, padding-free
micro-batches, checkpoints); unsloth contributes its patched model (fused kernels, its gradient checkpointing).
What ran is logged and recorded in metrics.json ("backend", "liger").
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from lora_pipeline.config import TrainConfig

log = logging.getLogger(__name__)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def unsloth_importable() -> bool:
    """unsloth raises on import without a GPU, so finding the package is not enough: import it."""
    if importlib.util.find_spec("unsloth") is None:
        return False
    try:
        import unsloth  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        log.debug("unsloth does not import: %s", exc)
        return False
    return True


def choose_backend(cfg: TrainConfig) -> str:
    """The backend that will run: "unsloth" or "peft" (see the module docstring)."""
    if cfg.backend == "peft":
        return "peft"
    cuda = cuda_available()
    if cuda and unsloth_importable():
        return "unsloth"
    if cfg.backend == "unsloth":
        why = "no CUDA device" if not cuda else "the unsloth package does not import"
        log.warning("train.backend unsloth: %s; training with transformers + peft", why)
    elif cuda:
        log.info("train.backend auto: unsloth is not installed; training with transformers + peft")
    return "peft"


def liger_available(cfg: TrainConfig) -> bool:
    """Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy) need CUDA and liger-kernel."""
    if not cfg.use_liger:
        return False
    if cuda_available() and importlib.util.find_spec("liger_kernel") is not None:
        return True
    if cuda_available():
        log.warning("train.use_liger: liger-kernel is not installed; training without Liger kernels")
    else:
        # INFO, not a warning: use_liger is on by default (the spec's default), so on CPU it says nothing wrong.
        log.info("train.use_liger: Liger kernels need CUDA and liger-kernel; training without them")
    return False


def load_unsloth_model(model_ref: str, cfg: TrainConfig, quant: dict[str, Any] | None) -> tuple[Any, Any]:
    """(LoRA-wrapped model, tokenizer) from unsloth, with the same LoRA settings as the peft path."""
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_ref,
        max_seq_length=cfg.max_seq_len,
        dtype=None,  # unsloth picks bf16 where the GPU has it, else fp16
        load_in_4bit=bool(quant and quant.get("bits") == 4),
        load_in_8bit=bool(quant and quant.get("bits") == 8),
        trust_remote_code=cfg.trust_remote_code,
    )
    from lora_pipeline.models import lora_settings, lora_targets

    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = FastLanguageModel.get_peft_model(
        model,
        **lora_settings(cfg),
        target_modules=lora_targets(cfg) or every_linear,
        random_state=cfg.seed,
        use_gradient_checkpointing="unsloth",
    )
    return model, tokenizer
