"""Register stage: record the trained adapter, with its lineage and scores, in a model registry.

registry.address picks the registry (see lora_pipeline.registry): `local` = the local SQLite file, empty
or `none` = skip, else the Kubeflow Model Registry. Always writes `registration.json`: what was registered,
where, the outcome and the registry's ids. A version is its adapter's content (a digest of its files); the
local registry points at its own copy, so retraining the run directory cannot change a registered version.
Registering needs a completed eval (the version's scores) unless registry.allow_no_eval. A registry that
cannot be reached fails this stage only: the train and eval outputs stay, and `lora-pipeline register -o
RUN_DIR` registers later without retraining.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from lora_pipeline.config import RegistryConfig
from lora_pipeline.errors import StageError
from lora_pipeline.files import atomic_dir, read_json, write_json_atomic
from lora_pipeline.redaction import redact_record, scrub
from lora_pipeline.registry import Entry, Scalar, kind, local_path, open_registry
from lora_pipeline.registry.artifacts import DIGEST_KEY, tree_digest
from lora_pipeline.registry.local import LocalRegistry
from lora_pipeline.stages.outputs import ADAPTER, DATASET_RECORD, EVAL_RESULTS, METRICS, REGISTRATION

log = logging.getLogger(__name__)

# KFP mounts artifacts under these local prefixes; the registry should hold the object-store URI instead.
_KFP_MOUNTS = {"/minio/": "s3://", "/s3/": "s3://", "/gcs/": "gs://"}
# adapter_config.json key -> metadata name
_LORA_KEYS = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}
_LORA_KEYS.update(use_rslora="use_rslora", use_dora="use_dora")
# metadata key -> env var that the KFP register component sets from its pipeline-run inputs (kubeflow/parameters.py)
_RUN_ENV = {"pipeline_run_id": "LORA_PIPELINE_KFP_RUN_ID", "pipeline_run_name": "LORA_PIPELINE_KFP_RUN_NAME"}


def register_adapter(cfg: RegistryConfig, train_dir: Path, eval_dir: Path | None, out: Path) -> Path:
    adapter = Path(train_dir) / ADAPTER
    if not (adapter / "adapter_config.json").exists():
        raise StageError(f"no adapter in {adapter}: run the train stage first", field="register")
    registering = kind(cfg) != "none"
    if registering and not cfg.allow_no_eval:
        _check_eval_results(eval_dir)
    uri, digest = _stored(cfg, adapter)
    merged = Path(train_dir) / "merged"  # train.merge's output: the version's second artifact
    merged_uri, merged_digest = _stored(cfg, merged) if merged.is_dir() else ("", "")
    entry = Entry(
        name=cfg.model_name,
        version=cfg.version,
        uri=uri,
        # free text sent to the registry and shown by `models show`: a URI quoted in it loses its credentials
        author=scrub(cfg.author),
        description=scrub(cfg.description),
        format_name=cfg.format_name,
        format_version=cfg.format_version,
        metadata=version_metadata(train_dir, eval_dir),
        digest=digest,
        merged_uri=merged_uri,
        merged_digest=merged_digest,
    )
    record: dict[str, Any] = {
        "model_name": entry.name,
        "version": entry.version,
        "author": entry.author,
        "description": entry.description,
        "model_format_name": entry.format_name,
        "model_format_version": entry.format_version,
        "uri": entry.uri,
        "source": str(adapter.resolve()),
        DIGEST_KEY: digest,
        **({"merged_uri": merged_uri, "merged_sha256": merged_digest} if merged_uri else {}),
        "metadata": entry.metadata,
        "registry_kind": kind(cfg),
    }
    if not registering:
        record.update(status="skipped", reason=f"registry.address is {repr(cfg.address) if cfg.address else 'empty'}")
        log.info("register: skipped (no registry address; `--registry.address local` registers in a local file)")
    else:
        record.update(_register(cfg, entry, Path(out)))
    with atomic_dir(out) as tmp:
        write_json_atomic(redact_record(record), tmp / REGISTRATION)
    return out


def _stored(cfg: RegistryConfig, folder: Path) -> tuple[str, str]:
    """(uri, digest) of an artifact folder: the local registry registers its own immutable copy, by content;
    a remote registry points at the folder where it is."""
    if kind(cfg) == "local":
        return LocalRegistry(local_path(cfg)).store(folder)
    return artifact_uri(folder), tree_digest(folder)


def _register(cfg: RegistryConfig, entry: Entry, out: Path) -> dict[str, Any]:
    """Register the entry; the outcome, and the scores the registry holds when they are not this run's."""
    registered_before = _registered_metadata(cfg, entry, out)
    outcome = open_registry(cfg).register(entry)
    record = outcome.to_dict()
    version = record.get("version", entry.version)  # the registry's, when it says
    verb = "registered" if outcome.status == "registered" else "already registered (same content, no change)"
    log.info("register: %s %s %s in %s", entry.name, version, verb, outcome.where)
    differ = score_differences(registered_before, entry.metadata) if outcome.status == "exists" else {}
    if differ:
        # The registry keeps a version as first registered: say when its scores are not this run's.
        record["registered_metadata"] = registered_before
        record["scores_differ"] = differ
        shown = "; ".join(f"{k[5:]} {_text(v['registered'])} there, {_text(v['run'])} here" for k, v in differ.items())
        log.warning(
            "register: %s %s holds other eval scores than this run's eval (%s): the registry keeps its own; "
            "a new --registry.version records these",
            entry.name,
            version,
            shown,
        )
    return record


def _check_eval_results(eval_dir: Path | None) -> None:
    """A version carries its scores: without eval results there are none (a compiled pipeline's register
    component sees only the eval output, so the file decides here; pre-flight also reads run.json)."""
    results = Path(eval_dir) / EVAL_RESULTS if eval_dir else None
    if not (results and results.is_file()):
        raise StageError(
            f"no completed eval ({results or 'no eval output'}): run the eval stage first, or set "
            "--registry.allow_no_eval true to register a version without scores",
            field="registry.allow_no_eval",
        )


def _registered_metadata(cfg: RegistryConfig, entry: Entry, out: Path) -> dict[str, Any] | None:
    """The metadata the registry holds for entry's name and version: read from the local registry, else
    (a remote one) from this output's previous registration record of the same version."""
    if kind(cfg) == "local":
        from lora_pipeline.registry import local_path
        from lora_pipeline.registry.local import LocalRegistry

        path = local_path(cfg)
        found = LocalRegistry(path).find(entry.name, entry.version) if path.exists() else None
        return found["metadata"] if found else None
    previous = out / REGISTRATION
    if not previous.is_file():
        return None
    old = read_json(previous)
    if (old.get("model_name"), old.get("version")) != (entry.name, entry.version):
        return None
    return old.get("registered_metadata") or old.get("metadata")


def score_differences(registered: dict[str, Any] | None, run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tuned eval scores (`eval.<task>.<metric>...`) that differ between the registry and this run, by key."""
    if not registered:
        return {}
    keys = [k for k in {**registered, **run} if k.startswith("eval.") and not k.endswith((".base", ".delta"))]
    return {
        k: {"registered": registered.get(k), "run": run.get(k)}
        for k in sorted(keys)
        if not _same(registered.get(k), run.get(k))
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _text(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "none" if value is None else str(value)


def artifact_uri(adapter: Path) -> str:
    """Where the adapter lives, as the registry should point to it: an absolute path (a PVC is a path), or
    the s3:// / gs:// URI of a KFP artifact mounted in the pod."""
    path = str(Path(adapter).resolve())
    for mount, scheme in _KFP_MOUNTS.items():
        if path.startswith(mount):
            return scheme + path[len(mount) :]
    return path


def version_metadata(train_dir: Path, eval_dir: Path | None) -> dict[str, Scalar]:
    """What a version carries besides its artifact: base model, dataset, LoRA settings, losses, eval scores.
    Flat scalars only: Kubeflow's custom properties are typed values, not nested objects."""
    train_dir = Path(train_dir)
    meta: dict[str, Any] = {}
    adapter_cfg = read_json(train_dir / ADAPTER / "adapter_config.json")
    meta["base_model"] = adapter_cfg.get("base_model_name_or_path")
    dataset = _dataset_info(train_dir)
    if dataset:
        meta["dataset_uri"] = scrub(str(dataset.get("source") or ""))  # recorded redacted; scrubbed again
        meta["dataset_sha256"] = dataset.get("sha256")
        meta["dataset_train_rows"], meta["dataset_eval_rows"] = dataset.get("train_rows"), dataset.get("eval_rows")
    for key, name in _LORA_KEYS.items():
        meta[name] = adapter_cfg.get(key)
    targets = adapter_cfg.get("target_modules")
    if isinstance(targets, list):  # PEFT records full module paths; their last names say what was adapted
        targets = ",".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    meta["lora_target_modules"] = targets
    metrics_file = train_dir / METRICS
    if metrics_file.exists():
        metrics = read_json(metrics_file)
        for key in ("final_loss", "mean_loss", "eval_loss", "epochs", "steps", "effective_batch_size"):
            meta[key] = metrics.get(key)
        if meta["mean_loss"] is None:  # a train output from before the rename called the mean `train_loss`
            meta["mean_loss"] = metrics.get("train_loss")
        meta["quantization"] = _quantization(metrics.get("quantization"))
    for key, env in _RUN_ENV.items():  # inside KFP: the pipeline run that registered this version
        meta[key] = os.environ.get(env, "").strip()
    results_file = Path(eval_dir) / EVAL_RESULTS if eval_dir else None
    if results_file and results_file.exists():
        for row in read_json(results_file).get("comparison", []):
            meta.update(_score_entries(row))
    # A diverged run's NaN loss is not valid JSON for the registry's REST API: left out, like a missing value.
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and v != "" and _finite(v)}


def _finite(value: Scalar) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def score_key(row: dict[str, Any]) -> str:
    """`eval.<task>.<metric>` (+ `.<filter>` unless lm-eval's 'none', + `.<precision>` unless full)."""
    parts = [row["task"], row["metric"]]
    if row.get("filter") not in (None, "", "none"):
        parts.append(row["filter"])
    if row.get("precision") not in (None, "", "full"):
        parts.append(str(row["precision"]).replace(" ", "-"))
    return "eval." + ".".join(parts)


def _score_entries(row: dict[str, Any]) -> dict[str, Any]:
    key = score_key(row)
    return {key: row.get("tuned"), f"{key}.base": row.get("base"), f"{key}.delta": row.get("delta")}


def _dataset_info(train_dir: Path) -> dict[str, Any] | None:
    """dataset.json, as the train stage copies it into its output: register reads only its upstream outputs
    (a Kubeflow register pod sees no other)."""
    record = train_dir / DATASET_RECORD
    return read_json(record) if record.is_file() else None


def _quantization(quant: Any) -> str:
    if isinstance(quant, dict) and quant.get("bits"):
        return f"{quant['bits']}-bit {quant.get('quant_type') or ''}".strip()
    return "none" if not quant else str(quant)
