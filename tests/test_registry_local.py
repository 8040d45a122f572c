"""The local registry from the command line: `models list|show`, the pre-flight clash check, and a token
option that never reaches run.json or printed config."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import shutil
import sqlite3
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_pipeline.cli import main
from lora_pipeline.config import Config, RegistryConfig
from lora_pipeline.demo import DemoAssets
from lora_pipeline.errors import ConfigError, RegistryError
from lora_pipeline.preflight import preflight
from lora_pipeline.registry import Entry, check_local
from lora_pipeline.registry.artifacts import next_patch
from lora_pipeline.registry.local import LocalRegistry
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
        "final_loss=0.4000, mean_loss=0.5000",
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


# --- --registry.version auto (issue 20 §1) -------------------------------------------------------------


def register_auto(run_dir: Path, db: Path, name: str = "demo-topic") -> dict:
    """`register -o RUN --registry.version auto`, in-process, as the demo registers."""
    flags = ["--registry.address", "local", "--registry.path", str(db), "--registry.model_name", name]
    assert main(["register", "-o", str(run_dir), *flags, "--registry.version", "auto"]) == 0
    return json.loads((run_dir / "register" / "registration.json").read_text())


def test_auto_takes_the_next_free_patch_or_the_version_of_the_same_content(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "shared" / "registry.db"  # one machine's registry, two clones' run directories
    first = register_auto(make_run(tmp_path / "clone1" / "runs" / "demo"), db)
    second = register_auto(make_run(tmp_path / "clone2" / "runs" / "demo"), db)
    assert [(first["version"], first["status"]), (second["version"], second["status"])] == [
        ("1.0.0", "registered"),
        ("1.0.1", "registered"),
    ]
    assert "registered: demo-topic 1.0.1 (registered" in capsys.readouterr().out
    same = tmp_path / "clone3" / "runs" / "demo"
    shutil.copytree(tmp_path / "clone2" / "runs" / "demo", same)  # the same content in another place
    shutil.rmtree(same / "register")
    again = register_auto(same, db)
    assert (again["version"], again["status"], again["model_version_id"]) == (
        "1.0.1",
        "exists",
        second["model_version_id"],
    )
    assert [r["version"] for r in LocalRegistry(db).versions("demo-topic")] == ["1.0.0", "1.0.1"]
    # another model's versions do not count, and a version given by hand still works beside auto
    assert register_auto(make_run(tmp_path / "other"), db, name="other-model")["version"] == "1.0.0"


@pytest.mark.parametrize(
    ("taken", "expected"),
    [
        ([], "1.0.0"),
        (["1.0.0"], "1.0.1"),
        (["1.0.0", "1.0.1", "1.0.2"], "1.0.3"),
        (["2.3.9", "1.0.0"], "2.3.10"),
        (["1.2.0-rc.1"], "1.2.1"),
        (["0.1.0+build.5", "0.0.9"], "0.1.1"),
    ],
)
def test_next_patch(taken: list[str], expected: str) -> None:
    assert next_patch(taken) == expected
    assert expected not in taken


def _register_distinct(args: tuple[str, str]) -> str:
    """One racer: its own run directory and content, auto version, the shared registry file."""
    root, db = map(Path, args)
    run_dir = make_run(root)
    cfg = RegistryConfig(address="local", path=str(db), model_name="race", version="auto")
    out = register_adapter(cfg, run_dir / "train", run_dir / "eval", run_dir / "register")
    return json.loads((out / "registration.json").read_text())["version"]


def _expect_distinct(versions: list[str], db: Path, n: int) -> None:
    assert sorted(versions, key=lambda v: int(v.rsplit(".", 1)[1])) == [f"1.0.{i}" for i in range(n)]
    rows = LocalRegistry(db).versions("race")
    assert len({r["uri"] for r in rows}) == n and len({r["metadata"]["artifact_sha256"] for r in rows}) == n


def test_racing_threads_get_distinct_versions(tmp_path: Path) -> None:
    n, db = 8, tmp_path / "registry.db"
    with ThreadPoolExecutor(n) as pool:
        versions = list(pool.map(_register_distinct, [(str(tmp_path / f"r{i}"), str(db)) for i in range(n)]))
    _expect_distinct(versions, db, n)


@pytest.mark.integration
def test_racing_processes_get_distinct_versions(tmp_path: Path) -> None:
    n, db = 4, tmp_path / "registry.db"
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        versions = list(pool.map(_register_distinct, [(str(tmp_path / f"p{i}"), str(db)) for i in range(n)]))
    _expect_distinct(versions, db, n)


def test_auto_is_the_demos_default_not_the_specs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lora_pipeline.demo as demo

    fake = DemoAssets(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "task", "demo_topic")
    monkeypatch.setattr(demo, "build_demo", lambda: fake)
    assert demo.demo_config()["registry"]["version"] == "auto"
    assert Config().registry.version == "1.0.0"


def test_auto_is_for_the_local_registry_only(tmp_path: Path) -> None:
    cfg = RegistryConfig(address="http://127.0.0.1:9", version="auto")
    with pytest.raises(ConfigError, match="auto applies to the local registry") as err:
        check_local(cfg, tmp_path / "train" / "adapter")
    assert err.value.field == "registry.version"


def test_the_copy_is_read_only_and_kept_once_per_content(tmp_path: Path) -> None:
    registry = LocalRegistry(tmp_path / "reg" / "registry.db")
    adapter = make_run(tmp_path / "run") / "train" / "adapter"
    first, digest = registry.store(adapter)
    again, digest_again = registry.store(adapter)
    assert (first, digest) == (again, digest_again) == (str(registry.blobs / "sha256" / digest), digest_of(adapter))
    assert all(not p.stat().st_mode & 0o222 for p in Path(first).rglob("*") if p.is_file())
    assert sorted(p.name for p in (registry.blobs / "sha256").iterdir()) == [digest]  # no temporary copy left


@pytest.mark.parametrize("metadata", ["not json", "[1, 2]", '{"artifact_sha256": 7}', "{}"])
def test_a_version_whose_digest_cannot_be_read_is_never_the_same_content(tmp_path: Path, metadata: str) -> None:
    db = tmp_path / "registry.db"
    run_dir = make_run(tmp_path / "run")
    register_auto(run_dir, db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE model_version SET metadata = ?", (metadata,))
    conn.close()
    cfg = RegistryConfig(address="local", path=str(db), model_name="demo-topic", version="1.0.0")
    with pytest.raises(RegistryError, match="1.0.0 already exists with other content"):
        register_adapter(cfg, run_dir / "train", run_dir / "eval", tmp_path / "again")
    cfg.version = "auto"
    out = register_adapter(cfg, run_dir / "train", run_dir / "eval", tmp_path / "again")
    assert json.loads((out / "registration.json").read_text())["version"] == "1.0.1"


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=st.lists(st.sampled_from("abcde"), min_size=1, max_size=12))
def test_auto_gives_each_content_one_version_in_order_of_first_registration(
    tmp_path_factory: pytest.TempPathFactory, contents: list[str]
) -> None:
    registry = LocalRegistry(tmp_path_factory.mktemp("auto") / "registry.db")
    got = [
        registry.register(Entry("m", "auto", f"/blobs/{c}", digest=hashlib.sha256(c.encode()).hexdigest())).version
        for c in contents
    ]
    firsts = list(dict.fromkeys(contents))
    assert got == [f"1.0.{firsts.index(c)}" for c in contents]
    assert [r["version"] for r in registry.versions("m")] == [f"1.0.{i}" for i in range(len(firsts))]
