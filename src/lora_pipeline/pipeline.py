"""run(config, run_dir): the four stages in order, each in its own sub-directory, cached by key.

A stage's cache key hashes its config section and the keys of the stages it reads, so changing only
an eval option reruns only eval. `run.json` in the run directory records config, versions, timings
and paths, and is rewritten after every stage so a failed run still tells how far it got.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lora_pipeline import __version__
from lora_pipeline.config import Config, is_local_uri, local_path
from lora_pipeline.files import package_versions, read_json, write_json_atomic

log = logging.getLogger(__name__)

STAGES = ("dataset", "train", "eval", "register")
UPSTREAM = {"dataset": (), "train": ("dataset",), "eval": ("train",), "register": ("train", "eval")}


def default_run_dir(demo: bool = False) -> Path:
    return Path("runs") / ("demo" if demo else time.strftime("%Y%m%d-%H%M%S"))


def demo_config() -> dict[str, Any]:
    """The demo's config layer: built-in tiny model, demo data and eval task, CPU-friendly settings."""
    from lora_pipeline.demo import DEMO_OVERRIDES, build_demo

    assets = build_demo()
    layer = copy.deepcopy(DEMO_OVERRIDES)
    layer.setdefault("dataset", {})["data_uri"] = str(assets.data_file)
    layer.setdefault("train", {})["model"] = str(assets.model_dir)
    layer.setdefault("eval", {}).update(tasks=[assets.task_name], include_path=str(assets.task_dir))
    return layer


def stage_key(config: Config, stage: str, run_dir: Path) -> str:
    section = {"dataset": config.dataset, "train": config.train, "eval": config.eval, "register": config.registry}
    payload: dict[str, Any] = {"stage": stage, "config": asdict(section[stage]), "version": __version__}
    if stage == "dataset" and config.dataset.data_uri and is_local_uri(config.dataset.data_uri):
        st = os.stat(local_path(config.dataset.data_uri))
        payload["source"] = [st.st_size, st.st_mtime_ns]  # a changed local file invalidates the cache
    if stage == "eval":
        payload["trust_remote_code"] = config.train.trust_remote_code
    payload["upstream"] = [_recorded_key(run_dir, up) for up in UPSTREAM[stage]]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recorded_key(run_dir: Path, stage: str) -> str | None:
    record = run_dir / stage / "stage.json"
    return read_json(record)["key"] if record.exists() else None


def _run_stage(config: Config, stage: str, run_dir: Path) -> None:
    out = run_dir / stage
    if stage == "dataset":
        from lora_pipeline.stages.dataset import prepare_dataset

        prepare_dataset(config.dataset, out)
    elif stage == "train":
        from lora_pipeline.stages.train import train_adapter

        train_adapter(config.train, run_dir / "dataset", out)
    elif stage == "eval":
        from lora_pipeline.stages.evaluate import evaluate_adapter

        evaluate_adapter(config.eval, run_dir / "train", out, trust_remote_code=config.train.trust_remote_code)
    else:
        from lora_pipeline.stages.register import register_adapter

        register_adapter(config.registry, run_dir / "train", run_dir / "eval", out)


def run(config: Config, run_dir: Path, stages: tuple[str, ...] = STAGES, force: bool = False) -> dict[str, Any]:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "run.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else {"stages": {}}
    manifest.update(run_dir=str(run_dir.resolve()), config=config.to_dict(), versions=_versions())
    manifest.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    for stage in stages:
        key = stage_key(config, stage, run_dir)
        out = run_dir / stage
        if not force and _recorded_key(run_dir, stage) == key:
            log.info("%s: cached (key %s), skipping", stage, key)
            manifest["stages"][stage] = {**manifest["stages"].get(stage, {}), "status": "cached"}
            continue
        log.info("%s: running", stage)
        manifest["stages"][stage] = {"status": "running", "path": str(out)}
        write_json_atomic(manifest, manifest_path)
        started = time.perf_counter()
        try:
            _run_stage(config, stage, run_dir)
        except BaseException:
            manifest["stages"][stage]["status"] = "failed"
            write_json_atomic(manifest, manifest_path)
            raise
        seconds = round(time.perf_counter() - started, 2)
        write_json_atomic({"key": key, "seconds": seconds}, out / "stage.json")
        manifest["stages"][stage] = {"status": "ran", "path": str(out), "key": key, "seconds": seconds}
        write_json_atomic(manifest, manifest_path)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(manifest, manifest_path)
    return manifest


def print_summary(manifest: dict[str, Any]) -> None:
    run_dir = Path(manifest["run_dir"])
    print(f"\nrun directory: {run_dir}")
    for stage, info in manifest["stages"].items():
        seconds = info.get("seconds")
        timing = f"{seconds:8.1f}s" if seconds is not None else " " * 9
        print(f"  {stage:<9} {info['status']:<7} {timing}  {info.get('path', '')}")
    results = run_dir / "eval" / "eval_results.json"
    if "eval" in manifest["stages"] and results.exists():
        from lora_pipeline.stages.evaluate import format_table

        print("\n" + format_table(read_json(results)["comparison"]))
    chart = run_dir / "train" / "loss_chart.html"
    if "train" in manifest["stages"] and chart.exists():
        print(f"\nloss chart: {chart}")


def _versions() -> dict[str, str]:
    names = ("lora-pipeline", "torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "bitsandbytes")
    return {"python": platform.python_version(), **package_versions(names)}
