"""Merged export (`train.merge`): the adapter folded into a full-precision copy of the base model.

The merge is done on a base loaded without quantization (fp32 on CPU, bf16/fp16 on GPU as in training), even
when training ran in 4-bit or 8-bit: merging
into quantized weights would round the adapter's small update away (and bitsandbytes layers cannot be saved
as a plain model). The result is an ordinary transformers checkpoint (safetensors + config + tokenizer) that
any server loads without peft. `adapter/` is written either way.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lora_pipeline.models import load_base_model, load_tokenizer

log = logging.getLogger(__name__)


def export_merged(model_ref: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Write `out_dir`: `model_ref` in full precision with the adapter of `adapter_dir` merged in, and the
    adapter's tokenizer (it carries the chat template used in training)."""
    from peft import PeftModel

    base = load_base_model(model_ref, None, trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(str(adapter_dir), trust_remote_code).save_pretrained(out_dir)
    log.info("train: merged model -> %s", out_dir)
    return out_dir
