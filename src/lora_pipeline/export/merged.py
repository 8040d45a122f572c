"""Merged export (`train.merge`, `export --merged`): the adapter folded into a full-precision copy of the base model.

The merge is done on a base loaded without quantization (fp32 on CPU, bf16/fp16 on GPU as in training), even
when training ran in 4-bit or 8-bit: merging
into quantized weights would round the adapter's small update away (and bitsandbytes layers cannot be saved
as a plain model). The result is an ordinary transformers checkpoint (safetensors + config + tokenizer) that
any server loads without peft. `adapter/` is written either way.
`push_folders` uploads what `lora-pipeline export` wrote (export_command.py) to the Hugging Face Hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lora_pipeline.errors import ConfigError, StageError
from lora_pipeline.models import load_base_model, load_tokenizer

log = logging.getLogger(__name__)


def merged_model(model_ref: str, adapter_dir: Path, trust_remote_code: bool = False) -> Any:
    """`model_ref` in full precision with the adapter of `adapter_dir` merged in (a plain transformers model)."""
    from peft import PeftModel

    base = load_base_model(model_ref, None, trust_remote_code)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def export_merged(model_ref: str, adapter_dir: Path, out_dir: Path, trust_remote_code: bool = False) -> Path:
    """Write `out_dir`: `model_ref` in full precision with the adapter of `adapter_dir` merged in, and the
    adapter's tokenizer (it carries the chat template used in training)."""
    merged_model(model_ref, adapter_dir, trust_remote_code).save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(str(adapter_dir), trust_remote_code).save_pretrained(out_dir)
    log.info("train: merged model -> %s", out_dir)
    return out_dir


def check_repo_id(repo: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ConfigError(f"not a Hub repo id ({str(exc).splitlines()[0]})", field="--push-to-hub") from None
    return repo


def push_folders(repo: str, folders: list[Path], private: bool = False) -> str:
    """Upload each folder's files to the root of the Hub model repo `repo` (created if missing). The merged
    model's and the GGUF folder's file names do not collide, so one repo serves transformers and Ollama.
    HF_TOKEN (and HF_ENDPOINT) come from the environment; the token is never logged or recorded."""
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)
    try:
        url = api.create_repo(repo, repo_type="model", private=private, exist_ok=True)
        for folder in folders:
            message = f"lora-pipeline export: {folder.name}"
            api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message=message)
    except (HfHubHTTPError, OSError, httpx.HTTPError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0]
        server = getattr(exc, "server_message", None)  # the Hub's reason ("Invalid credentials ..."), if any
        detail += f": {server}" if server else ""
        raise StageError(f"upload to {repo} failed: {detail}", field="--push-to-hub") from None
    log.info("export: pushed %s to %s", ", ".join(f.name for f in folders), url)
    return str(url)
