"""A process killed at a chosen moment (SIGKILL, or SIGINT/SIGTERM) leaves what was there before whole, and
the same command afterwards completes. Each test pauses its process at the moment (a patched function prints
a marker, then sleeps), waits for the marker, and only then sends the signal: no timing guesswork."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import train_config
from lora_pipeline.files import read_json, tree_sha256

# argv: "module:attr.path:nth" (pause before its nth call), then the code to run with the rest as sys.argv.
PAUSING = """
import importlib, sys, time
spec, code, *rest = sys.argv[1:]
module, attr, nth = spec.split(":")
*path, name = attr.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def paused(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(nth):
        print("PAUSED", file=sys.stderr, flush=True)
        time.sleep(300)
    return original(*args, **kwargs)
setattr(owner, name, paused)
sys.argv = ["-c", *rest]
exec(code)
"""
CLI = "from lora_pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def kill_when_paused(at: str, code: str, *args: str, sig: signal.Signals = signal.SIGKILL) -> str:
    """Run `code` with `args`, paused before the call `at` names; send `sig` there. The process's stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSING, at, code, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    lines = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:  # ends when the process does: a run that never pauses fails below
        lines.append(line)
        if line.strip() == "PAUSED" or time.monotonic() > deadline:
            break
    assert lines and lines[-1].strip() == "PAUSED", "".join(lines)[-3000:]
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the interrupted process must not have completed"
    return "".join(lines) + rest


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_compile_killed_while_writing_leaves_the_previous_file(tmp_path: Path, sig: signal.Signals) -> None:
    pytest.importorskip("kfp")
    yaml = pytest.importorskip("yaml")
    out = tmp_path / "pipeline.yaml"
    out.write_text("# the previous compile\n")
    before = digest(out)
    # kfp opens the file, writes its comments, then dumps the spec: paused there, the kill lands mid-write.
    kill_when_paused("yaml:dump_all:1", CLI, "compile", "-o", str(out), sig=sig)
    assert digest(out) == before
    done = subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", "compile", "-o", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deploymentSpec" in next(yaml.safe_load_all(out.read_text()))
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline.yaml"]  # the killed write's folder is gone too


@pytest.mark.integration
def test_a_copy_into_the_registry_cut_off_by_a_kill_is_removed_by_the_next(tmp_path: Path) -> None:
    from lora_pipeline.registry.artifacts import store

    adapter, blobs = tmp_path / "adapter", tmp_path / "blobs"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    code = "from pathlib import Path; from lora_pipeline.registry import artifacts\n"
    code += "artifacts.store(*map(Path, sys.argv[1:]))"
    # the second digest is the copy's: the files are in the store's temporary folder, not yet renamed
    kill_when_paused("lora_pipeline.registry.artifacts:tree_digest:2", code, str(adapter), str(blobs))
    assert [p.name for p in (blobs / "sha256").iterdir() if p.name.startswith(".tmp-")]  # cut off mid-copy

    copy, content = store(adapter, blobs)
    assert [p.name for p in (blobs / "sha256").iterdir()] == [content]
    assert tree_sha256(copy) == tree_sha256(adapter) == content


# The train stage in a process of its own: config as JSON, then dataset and output dirs.
TRAIN = """
import json
from pathlib import Path
from lora_pipeline.config import TrainConfig
from lora_pipeline.stages.train import train_adapter
train_adapter(TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.mark.integration
def test_a_kill_during_the_final_save_keeps_the_epoch_checkpoints_for_the_resume(demo_assets, tmp_path: Path) -> None:
    from lora_pipeline.config import DatasetConfig
    from lora_pipeline.stages.dataset import prepare_dataset
    from lora_pipeline.stages.train import train_adapter

    dataset = prepare_dataset(DatasetConfig(data_uri=str(demo_assets.data_file), subset=40), tmp_path / "dataset")
    steps_per_epoch = -(-read_json(dataset / "dataset.json")["train_rows"] // 8)
    # a checkpoint at each epoch's end: the last one is the final step, from which the rerun resumes
    cfg = train_config(demo_assets.model_dir, epochs=2, save_epoch=True, checkpoint_steps=steps_per_epoch)
    cfg = dataclasses.replace(cfg, checkpoint_minutes=0.0)
    out = tmp_path / "train"
    work = out.with_name(f".{out.name}.work")
    config = json.dumps(dataclasses.asdict(cfg))
    # The loss chart is written last, inside the output's temporary folder: the adapter is saved by then.
    kill_when_paused("lora_pipeline.reports.loss_chart:write_loss_chart:1", TRAIN, config, str(dataset), str(out))
    assert not out.exists()
    saved = {p.name: tree_sha256(p) for p in (work / "epoch_checkpoints").glob("checkpoint-*")}
    assert set(saved) == {f"checkpoint-{steps_per_epoch}", f"checkpoint-{2 * steps_per_epoch}"}

    train_adapter(cfg, dataset, out)
    metrics = read_json(out / "metrics.json")
    assert (metrics["steps"], metrics["resumed_from_step"]) == (2 * steps_per_epoch, 2 * steps_per_epoch)
    assert {p.name: tree_sha256(p) for p in (out / "checkpoints").iterdir()} == saved
    assert not work.exists()


@pytest.mark.integration
def test_a_demo_build_killed_before_it_is_published_leaves_nothing_the_next_keeps(tmp_path: Path) -> None:
    from lora_pipeline.demo import build_demo

    code = "from pathlib import Path; from lora_pipeline.demo import build_demo; build_demo(Path(sys.argv[1]))"
    kill_when_paused("lora_pipeline.demo.build:_swap_into_place:1", code, str(tmp_path))  # built, not published
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".demo-tmp-")]

    assets = build_demo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert assets.model_dir.is_dir()


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=lambda s: s.name)
def test_a_stage_stopped_after_its_output_is_in_place_is_recorded_not_redone(
    chat_file: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    from conftest import run_cli

    run_dir = tmp_path / "run"
    args = ("dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file))
    # output_manifest runs once the stage's output is renamed into place, before its stage.json is written
    kill_when_paused("lora_pipeline.pipeline:output_manifest:1", CLI, *args, sig=sig)
    out = run_dir / "dataset"
    assert not (out / "stage.json").exists()
    placed = {p.name: digest(p) for p in out.iterdir()}
    inode = out.stat().st_ino

    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "dataset: completed before the last run was stopped; recording its output" in again.stderr
    assert out.stat().st_ino == inode and {p.name: digest(p) for p in out.iterdir() if p.name != "stage.json"} == placed
    assert read_json(run_dir / "run.json")["stages"]["dataset"]["status"] == "ran"
    assert "dataset: cached" in run_cli(*args).stderr  # recorded like a stage that ran to the end
    # an option that changes the output is not taken for the stopped attempt's
    changed = run_cli(*args, "--dataset.seed", "7")
    assert changed.returncode == 0 and "dataset: running" in changed.stderr


@pytest.mark.integration
def test_a_deletion_cut_off_by_a_kill_leaves_no_partial_copy_for_the_next_registration(tmp_path: Path) -> None:
    from lora_pipeline.registry import Entry
    from lora_pipeline.registry.artifacts import verify
    from lora_pipeline.registry.local import LocalRegistry

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        (adapter / name).write_bytes(os.urandom(1024))
    registry = LocalRegistry(tmp_path / "registry" / "registry.db")
    uri, content = registry.store(adapter)
    registry.register(Entry("m", "1.0.0", uri, digest=content))
    code = "from lora_pipeline.registry.local import LocalRegistry; LocalRegistry(sys.argv[1]).delete('m', '1.0.0')"
    # the version's row is gone (committed); its copy is being removed, one file already unlinked
    kill_when_paused("os:unlink:2", code, str(registry.path))
    assert registry.versions("m") == []

    uri, again = registry.store(adapter)
    assert again == content and verify(uri, content) is None  # a whole copy, not what the kill left
    assert [p.name for p in (registry.blobs / "sha256").iterdir()] == [content]


@pytest.mark.integration
def test_checkpoints_half_discarded_by_a_killed_run_are_never_resumed(tmp_path: Path) -> None:
    from lora_pipeline.training.checkpoints import NEEDED_FILES, STATE_FILE, prepare_work_dir

    work = tmp_path / ".train.work"
    checkpoint = work / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    extra = [f"tokenizer-{i}.json" for i in range(20)]  # most of a removal's first unlinks: resumable still
    for name in (*NEEDED_FILES, "rng_state.pth", "adapter_config.json", "README.md", *extra):
        (checkpoint / name).write_bytes(b"x")
    (checkpoint / STATE_FILE).write_text('{"global_step": 3}')
    (work / "key").write_text("first")
    assert prepare_work_dir(work, "first") == checkpoint  # written for the key "first": resumable
    code = "from pathlib import Path; from lora_pipeline.training.checkpoints import prepare_work_dir\n"
    code += "prepare_work_dir(Path(sys.argv[1]), 'second')"
    # another config discards them; killed with one file removed
    kill_when_paused("os:unlink:2", code, str(work))
    assert prepare_work_dir(work, "first") is None  # not what is left of them


@pytest.mark.integration
def test_an_output_moved_aside_by_a_killed_swap_is_put_back(tmp_path: Path) -> None:
    from lora_pipeline.files import atomic_dir

    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_text("previous")
    code = "from pathlib import Path; from lora_pipeline.files import atomic_dir\n"
    code += "with atomic_dir(Path(sys.argv[1])) as tmp: (tmp / 'model.safetensors').write_text('new')"
    # paused between the two renames: the previous output moved aside, the new one not yet in its place
    kill_when_paused("os:replace:2", code, str(out))
    assert not out.exists()

    with pytest.raises(RuntimeError), atomic_dir(out):  # the next write fails: what was there before is kept
        raise RuntimeError("failed")
    assert (out / "model.safetensors").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
