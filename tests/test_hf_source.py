"""hf:// sources read from a Hugging Face cache built by hand (the hub cache layout: refs/main -> a snapshot
directory named by its commit), offline: configs, splits, revisions, fingerprints, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, run_cli, write_jsonl
from helpers import use_offline_hub_cache
from lora_pipeline import sources
from lora_pipeline.config import DatasetConfig
from lora_pipeline.errors import SourceError
from lora_pipeline.files import read_json, read_jsonl
from lora_pipeline.stages.dataset import prepare_dataset

SHA = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"
CARD = """---
configs:
- config_name: alpaca
  data_files:
  - split: train
    path: alpaca/train-*.jsonl
- config_name: chat
  default: true
  data_files:
  - split: train
    path: chat/train.jsonl
  - split: validation
    path: chat/validation.jsonl
---
# A test dataset
"""


def _snapshot(hub: Path, sha: str, chat_rows: list) -> Path:
    root = hub / "datasets--owner--name" / "snapshots" / sha
    (root / "chat").mkdir(parents=True)
    (root / "alpaca").mkdir()
    (root / "README.md").write_text(CARD)
    write_jsonl(root / "chat" / "train.jsonl", chat_rows)
    write_jsonl(root / "chat" / "validation.jsonl", CHAT_ROWS[:3])
    write_jsonl(root / "alpaca" / "train-0.jsonl", [{"instruction": "Q", "output": "A"}] * 4)
    return root


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An HF cache holding owner/name at two commits, main pointing at SHA; offline, as HF_HUB_OFFLINE=1 sets."""
    hub = tmp_path / "hub"
    _snapshot(hub, SHA, CHAT_ROWS)
    _snapshot(hub, OLD, CHAT_ROWS[:10])
    return use_offline_hub_cache(hub, SHA, monkeypatch, tmp_path)


def _read(uri: str, out: Path) -> tuple[list[dict], dict]:
    out = prepare_dataset(DatasetConfig(data_uri=uri, data_split=1.0), out)
    return read_jsonl(out / "train.jsonl"), read_json(out / "dataset.json")


def test_default_config_train_split(hub: Path, tmp_path: Path) -> None:
    train, meta = _read("hf://owner/name", tmp_path / "ds")
    assert len(train) == 40 and meta["files"] == ["chat/train.jsonl"] and meta["source"] == "hf://owner/name"
    assert sources.fingerprint("hf://owner/name") == f"hf:{SHA}"


def test_config_split_and_revision(hub: Path, tmp_path: Path) -> None:
    train, meta = _read("hf://owner/name/chat?split=validation", tmp_path / "a")
    assert len(train) == 3 and meta["source"] == "hf://owner/name/chat?split=validation"  # nothing to redact
    train, meta = _read("hf://owner/name/alpaca", tmp_path / "b")
    assert meta["formats"] == {"alpaca/train-0.jsonl": "alpaca"} and len(train) == 4
    train, _ = _read(f"hf://datasets/owner/name?revision={OLD}", tmp_path / "c")
    assert len(train) == 10
    assert sources.fingerprint(f"hf://owner/name?revision={OLD}") == f"hf:{OLD}"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("hf://owner/other", "owner/other is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
        ("hf://owner/name?split=test", "no split 'test' (splits: train, validation)"),
        ("hf://owner/name/nope", "BuilderConfig 'nope' not found"),
        ("hf://owner/name?splt=train", "unknown option 'splt'"),
        ("hf://a/b/c/d", "expected hf://owner/name[/config]"),
    ],
)
def test_missing_repo_split_or_config_is_one_line(hub: Path, uri: str, message: str) -> None:
    with pytest.raises(SourceError) as err:
        sources.fingerprint(uri)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.field == "dataset.data_uri"


@pytest.mark.integration
def test_the_cli_honours_hf_environment_variables(tmp_path: Path) -> None:
    hub = tmp_path / "home" / "hub"
    _snapshot(hub, SHA, CHAT_ROWS)
    (hub / "datasets--owner--name" / "refs").mkdir()
    (hub / "datasets--owner--name" / "refs" / "main").write_text(SHA)
    env = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "", "HF_DATASETS_CACHE": ""}
    env = {k: v for k, v in env.items() if v} | {"HF_DATASETS_OFFLINE": "1"}
    result = run_cli("dataset", "--dataset.data_uri", "hf://owner/name", "--out", str(tmp_path / "ds"), env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["rows_read"] == 40
