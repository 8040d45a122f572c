from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}, {"role": "assistant", "content": str(2 * i)}]}
    for i in range(40)
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The console script as a user runs it (a fresh interpreter, real exit code and stderr)."""
    return subprocess.run(
        [sys.executable, "-m", "lora_pipeline.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def cli_exit_code(argv: list[str]) -> int:
    """`cli.main` in this process: its exit code, whether it returns it or argparse exits with it."""
    from lora_pipeline.cli import main

    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory):
    """The demo model, data and task, built once per test session into a private home."""
    from lora_pipeline.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def demo_dataset(demo_assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset stage's output for the first 96 demo rows: 72 train rows (9 steps of 8), 24 eval rows.
    Shared by the session: a test that must change it copies it first."""
    from lora_pipeline.config import DatasetConfig
    from lora_pipeline.stages.dataset import prepare_dataset

    config = DatasetConfig(data_uri=str(demo_assets.data_file), subset=96, data_split=0.75)
    return prepare_dataset(config, tmp_path_factory.mktemp("demo-dataset") / "dataset")


@pytest.fixture(autouse=True)
def private_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test registers into its own local registry file (the demo registers locally)."""
    path = tmp_path / "registry.db"
    monkeypatch.setenv("LORA_PIPELINE_REGISTRY", str(path))
    return path


@pytest.fixture(autouse=True)
def library_verbosity_stays_in_its_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run at DEBUG sets TRANSFORMERS_VERBOSITY / DATASETS_VERBOSITY in the process (so that libraries
    imported later log at DEBUG too); in a test process that would leak into every later test's
    subprocesses. monkeypatch restores both to their state before the test."""
    for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
