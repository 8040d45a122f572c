"""Register stage: record the trained adapter in a model registry; skipped when no address is set.

Always writes `registration.json`: what was (or would be) registered and the outcome. Registry clients
sit behind a name table so the Kubeflow Model Registry client and a local registry plug in here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lora_pipeline.config import RegistryConfig
from lora_pipeline.errors import RegistryError, StageError
from lora_pipeline.files import atomic_dir, read_json, write_json_atomic

log = logging.getLogger(__name__)


def register_adapter(cfg: RegistryConfig, train_dir: Path, eval_dir: Path | None, out: Path) -> Path:
    adapter = Path(train_dir) / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise StageError(f"no adapter in {adapter}: run the train stage first", field="register")
    record: dict[str, Any] = {
        "model_name": cfg.model_name,
        "version": cfg.version,
        "author": cfg.author,
        "description": cfg.description,
        "model_format_name": cfg.format_name,
        "model_format_version": cfg.format_version,
        "uri": str(adapter.resolve()),
        "metadata": version_metadata(train_dir, eval_dir),
    }
    if not cfg.address:
        record.update(status="skipped", reason="registry.address is empty")
        log.info("register: skipped (no registry address)")
    else:
        raise RegistryError(
            "the Kubeflow Model Registry client is not wired in yet; leave the address empty to skip",
            field="registry.address",
        )
    with atomic_dir(out) as tmp:
        write_json_atomic(record, tmp / "registration.json")
    return out


def version_metadata(train_dir: Path, eval_dir: Path | None) -> dict[str, Any]:
    """What a registry version carries besides the artifact: base model, losses, eval scores."""
    meta: dict[str, Any] = {}
    adapter_cfg = read_json(Path(train_dir) / "adapter" / "adapter_config.json")
    meta["base_model"] = adapter_cfg.get("base_model_name_or_path")
    meta["lora_r"], meta["lora_alpha"] = adapter_cfg.get("r"), adapter_cfg.get("lora_alpha")
    metrics_file = Path(train_dir) / "metrics.json"
    if metrics_file.exists():
        metrics = read_json(metrics_file)
        meta["train_loss"], meta["eval_loss"] = metrics.get("train_loss"), metrics.get("eval_loss")
    results_file = Path(eval_dir) / "eval_results.json" if eval_dir else None
    if results_file and results_file.exists():
        for row in read_json(results_file).get("comparison", []):
            meta[f"eval_{row['task']}_{row['metric']}"] = row["tuned"]
    return meta
