"""run(config, run_dir): the stages of the stage table in order, each in its own folder, cached by key.

A stage's cache key (cache_keys.py) hashes the options of its config section that change its output, the content of
what it reads from outside (the data source, the base model's files, local eval tasks) and the keys of
its upstream stages, so editing a data file reruns everything and changing only an eval option reruns
only eval and register. One process at a time holds a run directory (a lock file). `run.json` records
the resolved config (secrets redacted), versions, each invocation's overrides, and per-stage status; it
is rewritten after every stage, so a failed or interrupted run still tells how far it got.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.cache_keys import read_record, recorded_key, stage_key
from lora_pipeline.config import (
    Config,
    data_locations,
    from_dict,
    kubernetes_only,
)
from lora_pipeline.errors import ConfigError
from lora_pipeline.files import (
    exclusive_lock,
    package_versions,
    read_json,
    sha256_file,
    write_json_atomic,
    write_text_atomic,
)
from lora_pipeline.redaction import is_redacted, redact_config, scrub
from lora_pipeline.registry import remember_secret
from lora_pipeline.stages import Stage, resolve

log = logging.getLogger(__name__)

MANIFEST = "run.json"


def default_run_dir(demo: bool = False) -> Path:
    return Path("runs") / ("demo" if demo else time.strftime("%Y%m%d-%H%M%S"))


def recorded_config(run_dir: Path) -> dict[str, Any] | None:
    """The config a run directory was last run with (None for a new directory)."""
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return None
    config = read_record(path).get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: no recorded config; fix or delete the file", field="-o")
    try:
        from_dict(config)  # a hand-edited value is named with the file it is in, not as a flag
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; fix or delete the file", field="-o") from None
    return config


def _recorded_only(config: Config) -> list[str]:
    """The dataset locations (data_uri, sources, eval_uri) that came from run.json with their credentials
    removed: they cannot be fetched again."""
    return [option for option, uri in data_locations(config.dataset) if is_redacted(uri)]


def source_is_recorded_only(config: Config) -> bool:
    return bool(_recorded_only(config))


def recorded_only_reason(config: Config) -> str | None:
    """Why the dataset stage's completed output is reused without its key: its source cannot be fetched again."""
    return "the source URI's credentials are not stored" if source_is_recorded_only(config) else None


def check_recorded_source(config: Config, run_dir: Path, stages: tuple[str, ...]) -> None:
    lost = _recorded_only(config)
    if "dataset" in stages and lost and recorded_key(run_dir, "dataset") is None:
        flag = "--dataset.source" if lost[0].startswith("dataset.sources") else f"--{lost[0]}"
        raise ConfigError(f"the recorded URI had credentials, which are never stored: give {flag} again", field=lost[0])


# --- output manifests -----------------------------------------------------------------------------------

# Files up to this size are recorded by sha256 too; larger ones by size, and by mtime for the stages downstream.
HASHED_BYTES = 1 << 20


def output_manifest(out: Path) -> dict[str, dict[str, Any]]:
    """Every file a stage wrote (relative path -> size, and sha256 for small files, else the mtime: a retrained
    adapter has the same size), recorded in stage.json."""
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(q for q in Path(out).rglob("*") if q.is_file() and q.name != "stage.json"):
        st = p.stat()
        small = st.st_size <= HASHED_BYTES
        files[p.relative_to(out).as_posix()] = {"size": st.st_size} | (
            {"sha256": sha256_file(p)} if small else {"mtime_ns": st.st_mtime_ns}
        )
    return files


def _upstream_digests(run_dir: Path, stage: Stage) -> dict[str, str | None]:
    """A digest of each upstream stage's recorded outputs: what this stage read, to tell when it was redone."""
    digests: dict[str, str | None] = {}
    for up in stage.upstream:
        try:
            outputs = read_json(Path(run_dir) / up / "stage.json").get("outputs")
        except (OSError, ValueError, AttributeError):
            outputs = None
        digests[up] = hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:16] if outputs else None
    return digests


def _reusable(run_dir: Path, stage: Stage, key: str, force: bool) -> bool:
    """The stage's last completed run had this key and read the upstream outputs there are now, and its outputs
    (and its upstream stages') are as recorded."""
    if force or recorded_key(run_dir, stage.name) != key:
        return False
    changed = _changed_outputs(run_dir, stage) or _redone_upstream(run_dir, stage)
    if changed:
        log.info("%s: rerunning: %s", stage.name, changed)
        return False
    log.info("%s: cached (key %s), skipping", stage.name, key)
    return True


def _redone_upstream(run_dir: Path, stage: Stage) -> str | None:
    recorded = read_json(Path(run_dir) / stage.name / "stage.json").get("upstream_outputs")
    if not isinstance(recorded, dict):
        return None  # recorded before upstream digests were
    now = _upstream_digests(run_dir, stage)
    redone = [up for up in stage.upstream if recorded.get(up) != now[up]]
    return f"{redone[0]} was redone since this stage ran" if redone else None


def _changed_outputs(run_dir: Path, stage: Stage) -> str | None:
    """Why a stage whose key matches cannot be reused: one of its or its upstream stages' recorded outputs
    is missing or changed (None when all are as recorded, or when the record predates output manifests)."""
    for name in (*stage.upstream, stage.name):
        out = Path(run_dir) / name
        if not (out / "stage.json").is_file():
            return f"{name} has no completed output"
        try:
            recorded = read_json(out / "stage.json").get("outputs")
        except (OSError, ValueError, AttributeError):
            return f"{name}/stage.json is unreadable"
        for rel, info in (recorded or {}).items() if isinstance(recorded, dict) else ():
            path = out / rel
            if not path.is_file():
                return f"{name}/{rel} is missing"
            expected = info if isinstance(info, dict) else {}
            if path.stat().st_size != expected.get("size") or (
                "sha256" in expected and sha256_file(path) != expected["sha256"]
            ):
                return f"{name}/{rel} changed since the stage ran"
    return None


# --- the run ------------------------------------------------------------------------------------------


def run(
    config: Config,
    run_dir: Path,
    stages: tuple[str, ...] | None = None,
    force: bool = False,
    source_fingerprint: str | None = None,
    invocation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run `stages` (default: all, in table order) into `run_dir`, holding its lock. A run directory that this
    call created and in which no stage completed is removed again on failure, so a bad input leaves nothing behind."""
    run_dir = Path(run_dir)
    stages = table.NAMES if stages is None else stages
    created = not run_dir.exists()
    try:
        with exclusive_lock(run_dir / ".lock", what=f"run directory {run_dir}"):
            return _run_locked(config, run_dir, stages, force, source_fingerprint, invocation)
    except BaseException:
        if created and not any((run_dir / s.name).exists() for s in table.STAGES):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


_MANIFEST_FIELDS = (("stages", dict), ("invocations", list), ("config", dict), ("started", str))


def _run_locked(
    config: Config,
    run_dir: Path,
    stages: tuple[str, ...],
    force: bool,
    source_fingerprint: str | None,
    invocation: dict[str, Any] | None,
) -> dict[str, Any]:
    run_dir.chmod(0o700)
    _remove_leftovers(run_dir)
    remember_secret(config.registry)  # a registry token given in the config is scrubbed from run.json
    manifest_path = run_dir / MANIFEST
    manifest = _open_manifest(config, manifest_path, invocation)
    for stage in (table.BY_NAME[name] for name in stages):
        reason = resolve(stage.reuse)(config) if stage.reuse else None
        if reason:
            log.info("%s: %s; reusing the completed %s stage", stage.name, reason, stage.name)
            manifest["stages"][stage.name] = {**manifest["stages"].get(stage.name, {}), "status": "cached"}
            continue
        key = stage_key(config, stage, run_dir, source_fingerprint)
        if _placed_unrecorded(run_dir, stage, key, manifest["stages"].get(stage.name)):
            log.info("%s: completed before the last run was stopped; recording its output", stage.name)
            _record_stage(stage, run_dir, key, None, manifest, manifest_path)
            continue
        if _reusable(run_dir, stage, key, force):
            manifest["stages"][stage.name] = {**manifest["stages"].get(stage.name, {}), "status": "cached"}
            continue
        _run_stage(config, stage, run_dir, key, manifest, manifest_path)
    manifest["status"] = "completed"
    manifest["finished"] = _now()
    _write_manifest(manifest, manifest_path)
    _write_report(run_dir)
    return manifest


def _open_manifest(config: Config, path: Path, invocation: dict[str, Any] | None) -> dict[str, Any]:
    """run.json as this invocation starts: the earlier stages' records kept, the config and versions now."""
    manifest = read_record(path, _MANIFEST_FIELDS) if path.exists() else {"stages": {}}
    manifest.setdefault("stages", {})
    for name, info in manifest["stages"].items():
        if not isinstance(info, dict):
            raise ConfigError(f"{path}: stages.{name} is not an object; fix or delete the file", field="-o")
    manifest.update(
        run_dir=str(path.parent.resolve()),
        config=redact_config(config.to_dict()),
        versions=_versions(),
        status="running",
    )
    manifest.setdefault("started", _now())
    manifest.pop("finished", None)
    manifest.setdefault("invocations", []).append({"time": _now(), **(invocation or {})})
    manifest["kubernetes_only"] = kubernetes_only(config)
    if manifest["kubernetes_only"]:
        names = ", ".join(f"{k}={v}" for k, v in manifest["kubernetes_only"].items())
        log.info("%s: applies on Kubernetes only (compiled pipeline, TrainJob); this local run does not use it", names)
    return manifest


def _run_stage(
    config: Config, stage: Stage, run_dir: Path, key: str, manifest: dict[str, Any], manifest_path: Path
) -> None:
    """Run one stage into RUN_DIR/<stage>, recording its status, key and outputs (stage.json, run.json)."""
    out = run_dir / stage.name
    log.info("%s: running", stage.name)
    # What _placed_unrecorded needs to tell this attempt's output, should it be stopped before stage.json
    manifest["stages"][stage.name] = {"status": "running", "path": str(out), "key": key, "replaces": _dir_id(out),
                                      "upstream_outputs": _upstream_digests(run_dir, stage)}  # fmt: skip
    _write_manifest(manifest, manifest_path)
    started = time.perf_counter()
    try:
        inputs = {up: run_dir / up for up in stage.upstream}
        stage.call(getattr(config, stage.section), inputs, out)
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        manifest["stages"][stage.name]["status"] = manifest["status"] = status
        manifest["stages"][stage.name]["error"] = scrub(str(exc))[:500] or type(exc).__name__
        _write_manifest(manifest, manifest_path)
        _write_report(run_dir)
        raise
    _record_stage(stage, run_dir, key, round(time.perf_counter() - started, 2), manifest, manifest_path)


def _record_stage(
    stage: Stage, run_dir: Path, key: str, seconds: float | None, manifest: dict[str, Any], manifest_path: Path
) -> None:
    """A completed stage's stage.json (its key and outputs) and run.json entry."""
    out = run_dir / stage.name
    record = {"key": key, "seconds": seconds, "outputs": output_manifest(out)}
    write_json_atomic(record | {"upstream_outputs": _upstream_digests(run_dir, stage)}, out / "stage.json")
    manifest["stages"][stage.name] = {"status": "ran", "path": str(out), "key": key, "seconds": seconds}
    _write_manifest(manifest, manifest_path)


def _placed_unrecorded(run_dir: Path, stage: Stage, key: str, entry: Any) -> bool:
    """The stage's last attempt, with this key and these upstream outputs, renamed its output into place (a
    stage writes it atomically: it is complete) and was stopped before stage.json was written. Recorded now
    instead of rerun: a Ctrl-C at the end of hours of training does not retrain from scratch."""
    out = run_dir / stage.name
    if not isinstance(entry, dict) or entry.get("status") in ("ran", "cached") or (out / "stage.json").exists():
        return False
    # `replaces` tells this attempt's output from an older one that was already there when the attempt began
    placed = out.is_dir() and entry.get("replaces") != _dir_id(out)
    return placed and entry.get("key") == key and entry.get("upstream_outputs") == _upstream_digests(run_dir, stage)


def _dir_id(path: Path) -> str | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return f"{st.st_dev}:{st.st_ino}"


def _remove_leftovers(run_dir: Path) -> None:
    """A killed run's half-written stage outputs and launch folders. The run directory's lock is held, so no
    live process is writing them."""
    patterns = [f".{s.name}.{kind}-*" for s in table.STAGES for kind in ("tmp", "old")] + [".lora-pipeline-launch-*"]
    for pattern in patterns:
        for leftover in run_dir.glob(pattern):
            if leftover.is_dir() and not leftover.is_symlink():
                log.info("removing %s, left by a run that was killed", leftover.name)
                shutil.rmtree(leftover, ignore_errors=True)


def _write_report(run_dir: Path) -> None:
    """RUN_DIR/report.html, also after a failed stage (it shows how far the run got). A report that cannot
    be written is a warning: the run's outcome does not depend on it."""
    from lora_pipeline.reports.run_page import write_run_report

    try:
        write_run_report(run_dir)
    except Exception as exc:  # the report reads every stage's files; none of them may fail the run
        log.warning("report.html not written: %s", scrub(str(exc)))


def _write_manifest(manifest: dict[str, Any], path: Path) -> None:
    # The last pass: whatever a stage's error message repeated, no secret reaches the file.
    write_text_atomic(scrub(json.dumps(manifest, indent=2, default=str)) + "\n", path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions() -> dict[str, str]:
    names = ("lora-pipeline", "torch", "transformers", "peft", "lm_eval", "datasets", "accelerate", "bitsandbytes")
    return {"python": platform.python_version(), **package_versions(names)}
