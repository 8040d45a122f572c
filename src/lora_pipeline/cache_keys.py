"""Each stage's cache key: the options of its config section that change its output, what its `key` declaration
adds (the data source's fingerprint, the base model's files, local eval tasks), and its upstream stages' keys,
so editing a data file reruns everything and changing only an eval option reruns only eval and register."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lora_pipeline import __version__
from lora_pipeline.chat_templates import template_fingerprint
from lora_pipeline.config import Config, is_local_uri, local_path, output_options
from lora_pipeline.errors import ConfigError
from lora_pipeline.files import read_json, sha256_file, tree_sha256
from lora_pipeline.redaction import scrub
from lora_pipeline.sources import MODEL_SCHEMES
from lora_pipeline.stages import Stage, resolve


def stage_key(config: Config, stage: Stage, run_dir: Path, source_fingerprint: str | None = None) -> str:
    section = getattr(config, stage.section)
    payload: dict[str, Any] = {"stage": stage.name, "options": output_options(section), "version": __version__}
    if stage.key:
        payload.update(resolve(stage.key)(section, source_fingerprint))
    payload["upstream"] = [recorded_key(run_dir, up) for up in stage.upstream]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_key(section: Any, source_fingerprint: str | None) -> dict[str, Any]:
    """The data's locations without their credentials (which do not change the data), and its fingerprint."""
    options = output_options(section)
    options["data_uri"] = scrub(section.data_uri or "")
    if section.sources or section.eval_uri:  # absent otherwise: a plain data_uri run keeps its cache key
        options["sources"] = [{**s, "uri": scrub(s["uri"])} for s in section.sources]
        options["eval_uri"] = scrub(section.eval_uri or "")
    else:
        options.pop("sources", None)
        options.pop("eval_uri", None)
    return {"options": options, "source": source_fingerprint}


def train_key(section: Any, source_fingerprint: str | None) -> dict[str, Any]:
    """The base model's files, and a Jinja chat template by its text."""
    entries = {"model_files": _model_fingerprint(section.model)}
    if section.chat_template:
        entries["chat_template"] = template_fingerprint(section.chat_template)
    return entries


def eval_key(section: Any, source_fingerprint: str | None) -> dict[str, Any]:
    """Local task files (eval.include_path) by their content."""
    return {"tasks_files": _task_files_digest(Path(section.include_path))} if section.include_path else {}


def _task_files_digest(root: Path) -> str | None:
    return tree_sha256(root) if root.is_dir() else None


def _model_fingerprint(model: str) -> Any:
    """A local base model by its config and weight file sizes (hashing GBs of weights per run is too slow);
    an s3:// model by its objects' ETags, an oci:// one by its manifest digest."""
    if model.startswith(MODEL_SCHEMES):
        from lora_pipeline import sources

        return sources.model_fingerprint(model)
    path = Path(local_path(model))
    if not (is_local_uri(model) and path.is_dir()):
        return model
    files = sorted(p for p in path.iterdir() if p.is_file())
    config = path / "config.json"
    return {
        "config": sha256_file(config) if config.exists() else None,
        "sizes": {p.name: p.stat().st_size for p in files},
    }


def recorded_key(run_dir: Path, stage: str) -> str | None:
    record = Path(run_dir) / stage / "stage.json"
    return read_record(record, (("key", str),)).get("key") if record.exists() else None


def read_record(path: Path, fields: tuple[tuple[str, type], ...] = ()) -> dict[str, Any]:
    """A run record (run.json, stage.json) read back: a mapping, or one ConfigError naming the file. They are
    plain JSON that people edit by hand; `fields` are the keys whose type, when present, is checked."""
    try:
        data = read_json(path)
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise ConfigError(f"{path}: {reason}; fix or delete the file", field="-o") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a run record of lora-pipeline (expected a JSON object)", field="-o")
    for name, tp in fields:
        if name in data and not isinstance(data[name], tp):
            raise ConfigError(f"{path}: {name!r} is not a {tp.__name__}; fix or delete the file", field="-o")
    return data
