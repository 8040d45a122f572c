"""The local registry from the command line: `models list|show`, the pre-flight clash check, and a token
option that never reaches run.json or printed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_pipeline.cli import main
from lora_pipeline.config import Config, RegistryConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.preflight import preflight
from lora_pipeline.stages.register import register_adapter
from test_register import digest_of, make_run


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "registry.db"
    for name, version in (("a", "1.0.0"), ("b", "1.1.0")):
        run_dir = make_run(tmp_path / name)
        cfg = RegistryConfig(address="local", path=str(path), model_name="topic", version=version, author="ana")
        register_adapter(cfg, run_dir / "train", run_dir / "eval", run_dir / "register")
    return path


def test_models_list(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--path", str(db), "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "version", "base", "model", "registered", "score"]
    assert lines[1].split()[:3] == ["topic", "1.0.0", "/models/base"]
    assert lines[2].split()[:3] == ["topic", "1.1.0", "/models/base"]
    assert lines[1].endswith("demo_topic.acc 0.9000")
    assert "2 versions" in lines[-1]


def test_models_show_lineage(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--path", str(db), "show", "topic"]) == 0  # the latest version
    out = capsys.readouterr().out
    assert out.startswith("topic 1.1.0")
    for text in (
        str(tmp_path / "blobs" / "sha256" / digest_of(tmp_path / "b" / "train" / "adapter")),  # the registry's copy
        f"sha256 {digest_of(tmp_path / 'b' / 'train' / 'adapter')}  OK",
        "/models/base",
        "https://example.org/chat.jsonl?<redacted>",
        "ab" * 32,
        "r=8, alpha=16, dropout=0.0500, target_modules=q_proj,v_proj",
        "train_loss=0.5000",
        "demo_topic.acc",
        "+0.7000",
    ):
        assert text in out, text
    assert main(["models", "--path", str(db), "show", "topic", "1.0.0"]) == 0
    copy = tmp_path / "blobs" / "sha256" / digest_of(tmp_path / "a" / "train" / "adapter")
    assert str(copy) in capsys.readouterr().out


def test_models_show_unknown_is_one_line(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--path", str(db), "show", "topic", "9.9.9"]) == 2
    expected = "lora-pipeline: error: models: topic has no version '9.9.9' (versions: 1.0.0, 1.1.0)\n"
    assert capsys.readouterr().err == expected
    assert main(["models", "--path", str(tmp_path / "none.db"), "list"]) == 2
    assert "nothing registered yet" in capsys.readouterr().err


def test_preflight_refuses_a_taken_version_before_any_stage(db: Path, tmp_path: Path) -> None:
    config = Config()
    config.registry = RegistryConfig(address="local", path=str(db), model_name="topic", version="1.0.0")
    config.registry.allow_no_eval = True  # new-run has no eval yet; this test is about the version
    preflight(config, ("register",), tmp_path / "a", "-o")  # the same adapter: registering again is a no-op
    with pytest.raises(ConfigError, match="topic 1.0.0 already exists with other content") as err:
        preflight(config, ("register",), tmp_path / "new-run", "-o")
    assert err.value.field == "registry.version"
    config.registry.version = "2.0.0"
    preflight(config, ("register",), tmp_path / "new-run", "-o")


def test_token_option_is_never_recorded_nor_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORA_PIPELINE_SECRET_REGISTRY_TOKEN", "")  # restored after the test: main() sets it
    token = "tok-a1b2c3d4e5"
    run_dir = make_run(tmp_path / "run")
    flags = ["--registry.address", "none", "--registry.token", token]
    assert main(["register", "-o", str(run_dir), *flags, "--print_config"]) == 0
    printed = capsys.readouterr().out
    assert token not in printed and "token: <redacted>" in printed
    assert main(["register", "-o", str(run_dir), *flags]) == 0
    manifest = (run_dir / "run.json").read_text()
    assert token not in manifest
    assert json.loads(manifest)["config"]["registry"]["token"] == "<redacted>"
    assert token not in (run_dir / "register" / "registration.json").read_text()
