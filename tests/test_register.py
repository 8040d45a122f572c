"""Register stage: what a version carries (lineage, LoRA settings, losses, scores), skipping, the local
registry's idempotence and its refusal to overwrite, and the artifact URI."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_pipeline.cli import main
from lora_pipeline.config import RegistryConfig
from lora_pipeline.errors import RegistryError, StageError
from lora_pipeline.files import read_json
from lora_pipeline.registry import Entry
from lora_pipeline.registry.artifacts import canonical_adapter_config, tree_digest
from lora_pipeline.registry.commands import show_model
from lora_pipeline.registry.local import LocalRegistry
from lora_pipeline.stages.register import artifact_uri, register_adapter

SHA = "ab" * 32


def make_run(root: Path) -> Path:
    """A run directory as the stages leave it: dataset.json, the adapter, metrics and eval results."""
    adapter = root / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": "/models/base",
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.05,
                "target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "v_proj"],
                "use_rslora": False,
                "use_dora": False,
            }
        )
    )
    # Weights that differ per run directory: two runs are two contents, as two trainings would be.
    (adapter / "adapter_model.safetensors").write_bytes(f"weights of {root.resolve()}".encode())
    metrics = {"mean_loss": 0.5, "final_loss": 0.4, "eval_loss": 0.6, "epochs": 2, "steps": 20, "quantization": None}
    (root / "train" / "metrics.json").write_text(json.dumps(metrics))
    (root / "dataset").mkdir()
    dataset = {"source": "https://example.org/chat.jsonl?<redacted>", "sha256": SHA, "train_rows": 90, "eval_rows": 10}
    (root / "dataset" / "dataset.json").write_text(json.dumps(dataset))
    (root / "train" / "dataset.json").write_text(json.dumps(dataset))  # the train stage's copy: what register reads
    (root / "eval").mkdir()
    comparison = [
        {"task": "demo_topic", "metric": "acc", "filter": "none", "precision": "full", "tuned": 0.9, "base": 0.2},
        {"task": "gsm8k", "metric": "exact_match", "filter": "strict-match", "precision": "4-bit nf4", "tuned": 0.3}
        | {"base": 0.25, "delta": 0.05},
    ]
    comparison[0]["delta"] = 0.7
    (root / "eval" / "eval_results.json").write_text(json.dumps({"comparison": comparison}))
    return root


def digest_of(root: Path) -> str:
    """The content digest, computed here independently of the registry's code: sorted relative paths and
    each file's sha256."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest() + b"\n")
    return h.hexdigest()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def register(run_dir: Path, **options) -> dict:
    out = register_adapter(RegistryConfig(**options), run_dir / "train", run_dir / "eval", run_dir / "register")
    return read_json(out / "registration.json")


def test_empty_address_skips_and_records_the_lineage(run_dir: Path) -> None:
    record = register(run_dir)
    assert (record["status"], record["registry_kind"]) == ("skipped", "none")
    assert (record["model_name"], record["version"], record["author"]) == ("lora-model", "1.0.0", "pipeline")
    assert record["uri"] == str((run_dir / "train" / "adapter").resolve())
    assert record["artifact_sha256"] == digest_of(run_dir / "train" / "adapter")
    assert record["metadata"] == {
        "artifact_sha256": record["artifact_sha256"],
        "base_model": "/models/base",
        "dataset_uri": "https://example.org/chat.jsonl?<redacted>",
        "dataset_sha256": SHA,
        "dataset_train_rows": 90,
        "dataset_eval_rows": 10,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "use_rslora": False,
        "use_dora": False,
        "lora_target_modules": "q_proj,v_proj",
        "mean_loss": 0.5,
        "final_loss": 0.4,
        "eval_loss": 0.6,
        "epochs": 2,
        "steps": 20,
        "quantization": "none",
        "eval.demo_topic.acc": 0.9,
        "eval.demo_topic.acc.base": 0.2,
        "eval.demo_topic.acc.delta": 0.7,
        "eval.gsm8k.exact_match.strict-match.4-bit-nf4": 0.3,
        "eval.gsm8k.exact_match.strict-match.4-bit-nf4.base": 0.25,
        "eval.gsm8k.exact_match.strict-match.4-bit-nf4.delta": 0.05,
    }


def test_none_skips_too(run_dir: Path) -> None:
    assert register(run_dir, address="none")["status"] == "skipped"


def test_local_registers_then_the_same_version_is_a_no_op(run_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "reg" / "registry.db"
    first = register(run_dir, address="local", path=str(db))
    assert (first["status"], first["registry_kind"], first["registry"]) == ("registered", "local", str(db))
    again = register(run_dir, address="local", path=str(db))
    assert again["status"] == "exists"
    ids = ("registered_model_id", "model_version_id", "model_artifact_id")
    assert [again[k] for k in ids] == [first[k] for k in ids]
    (row,) = LocalRegistry(db).versions()
    assert (row["model"], row["version"], row["uri"]) == ("lora-model", "1.0.0", first["uri"])
    assert row["metadata"]["dataset_sha256"] == SHA


def test_local_new_version_joins_the_model_and_another_artifact_is_refused(run_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    first = register(run_dir, address="local", path=str(db))
    other = make_run(tmp_path / "other")
    second = register(other, address="local", path=str(db), version="1.1.0")
    assert second["registered_model_id"] == first["registered_model_id"]
    assert second["model_version_id"] != first["model_version_id"]
    with pytest.raises(RegistryError, match="1.0.0 already exists with other content") as err:
        register(other, address="local", path=str(db))  # 1.0.0 holds run_dir's adapter
    assert err.value.field == "registry.version"
    assert [r["uri"] for r in LocalRegistry(db).versions()] == [first["uri"], second["uri"]]  # nothing overwritten
    assert read_json(other / "register" / "registration.json")["version"] == "1.1.0"  # the refusal left it as it was


def test_registry_path_from_environment(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_PIPELINE_REGISTRY", str(tmp_path / "env.db"))
    assert register(run_dir, address="local")["registry"] == str(tmp_path / "env.db")
    monkeypatch.delenv("LORA_PIPELINE_REGISTRY")
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path / "home"))
    record = register(make_run(tmp_path / "second"), address="local", version="2.0.0")
    assert record["registry"] == str(tmp_path / "home" / "registry.db")


def test_without_eval_or_dataset_the_version_still_registers_when_allowed(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    (run_dir / "train" / "dataset.json").unlink()
    cfg = RegistryConfig(address="local", path=str(tmp_path / "r.db"), allow_no_eval=True)
    out = register_adapter(cfg, run_dir / "train", None, tmp_path / "reg")
    meta = read_json(out / "registration.json")["metadata"]
    assert "dataset_sha256" not in meta and not any(k.startswith("eval.") for k in meta)
    assert meta["base_model"] == "/models/base"


def test_no_adapter_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(StageError, match="run the train stage first"):
        register_adapter(RegistryConfig(), tmp_path / "train", None, tmp_path / "register")
    assert not (tmp_path / "register").exists()


@pytest.mark.parametrize(
    ("path", "uri"),
    [
        ("/minio/mlpipeline/v2/artifacts/run/train/adapter", "s3://mlpipeline/v2/artifacts/run/train/adapter"),
        ("/gcs/bucket/run/adapter", "gs://bucket/run/adapter"),
        ("/mnt/pvc/runs/x/train/adapter", "/mnt/pvc/runs/x/train/adapter"),
    ],
)
def test_artifact_uri_names_the_object_store_for_kfp_mounts(path: str, uri: str) -> None:
    assert artifact_uri(Path(path)) == uri


def test_non_finite_losses_are_left_out(run_dir: Path) -> None:
    metrics = run_dir / "train" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"eval_loss": 0.6', '"eval_loss": NaN'))
    meta = register(run_dir)["metadata"]
    assert "eval_loss" not in meta and meta["mean_loss"] == 0.5


def test_the_mean_loss_is_registered_as_mean_also_from_an_older_train_output(run_dir: Path) -> None:
    metrics = run_dir / "train" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"mean_loss"', '"train_loss"'))  # before the rename
    meta = register(run_dir)["metadata"]
    assert (meta["mean_loss"], meta["final_loss"]) == (0.5, 0.4) and "train_loss" not in meta


def _set_tuned_score(run_dir: Path, score: float) -> None:
    path = run_dir / "eval" / "eval_results.json"
    results = json.loads(path.read_text())
    results["comparison"][0]["tuned"] = score
    path.write_text(json.dumps(results))


@pytest.mark.parametrize("address", ["local", "kubeflow-recorded"])
def test_a_registered_version_with_other_scores_than_the_run_is_said_not_silent(
    run_dir: Path, tmp_path: Path, caplog, monkeypatch, address: str
) -> None:
    if address == "local":
        options = {"address": "local", "path": str(tmp_path / "r.db")}
    else:  # a remote registry: what it holds is this output's previous record of the same version
        from lora_pipeline.registry import Outcome

        held: set[tuple[str, str]] = set()

        class Remote:
            def register(self, entry):
                status = "exists" if (entry.name, entry.version) in held else "registered"
                held.add((entry.name, entry.version))
                return Outcome(status, "1", "2", "3", "https://registry.example")

        monkeypatch.setattr("lora_pipeline.stages.register.open_registry", lambda cfg: Remote())
        options = {"address": "https://registry.example"}
    first = register(run_dir, **options)
    assert first["status"] == "registered" and "scores_differ" not in first
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        same = register(run_dir, **options)
    assert (
        same["status"] == "exists"
        and "scores_differ" not in same
        and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    )
    _set_tuned_score(run_dir, 0.5)  # a narrowed re-eval: the run's result is no longer what was registered
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        again = register(run_dir, **options)
    assert again["status"] == "exists"
    assert again["scores_differ"] == {"eval.demo_topic.acc": {"registered": 0.9, "run": 0.5}}
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "demo_topic.acc 0.9000 there, 0.5000 here" in line and "registry keeps its own" in line


# --- a registered version is its content (issue 17 §2) --------------------------------------------------

_names = st.text("abcdefghij_.-", min_size=1, max_size=8).filter(lambda n: n not in (".", ".."))
_trees = st.dictionaries(st.lists(_names, min_size=1, max_size=3).map("/".join), st.binary(max_size=64), min_size=1)


def write_tree(root: Path, files: dict[str, bytes], order: list[str] | None = None) -> Path:
    for rel in order or list(files):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[rel])
    return root


def _valid(files: dict[str, bytes]) -> bool:
    """No path is also another's folder (a/b and a/b/c cannot both be files)."""
    return not any(other.startswith(rel + "/") for rel in files for other in files)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=_trees.filter(_valid), data=st.data())
def test_digest_is_the_content_not_the_place_and_any_change_shows(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes], data: st.DataObject
) -> None:
    root = tmp_path_factory.mktemp("tree")
    first = tree_digest(write_tree(root / "a", files))
    assert first == digest_of(root / "a")  # the documented definition, computed independently
    shuffled = data.draw(st.permutations(list(files)))
    assert tree_digest(write_tree(root / "elsewhere" / "b", files, shuffled)) == first  # place and order: no
    rel = data.draw(st.sampled_from(sorted(files)))
    changed = dict(files)
    changed[rel] = files[rel] + data.draw(st.binary(min_size=1, max_size=4))
    assert tree_digest(write_tree(root / "c", changed)) != first  # one more byte in one file: yes
    renamed = {(k + "x" if k == rel else k): v for k, v in files.items()}
    if _valid(renamed):
        assert tree_digest(write_tree(root / "d", renamed)) != first  # a file's name: yes


def retrain_in_place(run_dir: Path, r: int = 4) -> None:
    """What `run -o RUN --train.lora_r 4` does to a run directory: new adapter files at the same path."""
    config = run_dir / "train" / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 8', f'"r": {r}'))
    (run_dir / "train" / "adapter" / "adapter_model.safetensors").write_bytes(b"retrained with r=%d" % r)


def test_a_retrain_in_place_cannot_change_the_registered_version(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "reg" / "registry.db"
    flags = ["--registry.address", "local", "--registry.path", str(db)]
    assert main(["register", "-o", str(run_dir), *flags]) == 0
    first = read_json(run_dir / "register" / "registration.json")
    registered = first["artifact_sha256"]
    assert first["uri"] == str(db.parent / "blobs" / "sha256" / registered)  # the registry's own copy
    retrain_in_place(run_dir)
    capsys.readouterr()
    assert main(["register", "-o", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lora-model 1.0.0 already exists with other content" in err
    assert "no change" not in err
    (row,) = LocalRegistry(db).versions()
    assert row["metadata"]["lora_r"] == 8 and row["metadata"]["artifact_sha256"] == registered
    assert read_json(Path(row["uri"]) / "adapter_config.json")["r"] == 8  # the copy kept what was registered
    assert main(["models", "--path", str(db), "show", "lora-model"]) == 0
    assert f"sha256 {registered}  OK" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("edit", "changed since registration"),
        ("add", "changed since registration"),
        ("remove", "changed since registration"),
        ("delete-all", "the registered files are gone"),
    ],
)
def test_models_show_verifies_the_content(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, expected: str
) -> None:
    db = tmp_path / "registry.db"
    copy = Path(register(run_dir, address="local", path=str(db))["uri"])
    weights = copy / "adapter_model.safetensors"
    weights.chmod(0o644)
    if damage == "edit":
        weights.write_bytes(weights.read_bytes() + b"!")
    elif damage == "add":
        (copy / "extra.bin").write_bytes(b"")
    elif damage == "remove":
        weights.unlink()
    else:
        shutil.rmtree(copy)
    capsys.readouterr()
    assert main(["models", "--path", str(db), "show", "lora-model", "1.0.0"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and expected in captured.err and "lora-model 1.0.0" in captured.err
    assert "OK" not in captured.out


def test_a_version_registered_without_a_digest_is_never_the_same_content(run_dir: Path, tmp_path: Path) -> None:
    """Registrations made before digests were recorded: not verifiable, so not 'no change' either."""
    db = tmp_path / "registry.db"
    adapter = str((run_dir / "train" / "adapter").resolve())
    LocalRegistry(db).register(Entry(name="lora-model", version="1.0.0", uri=adapter))
    with pytest.raises(RegistryError, match="already exists with other content \\(no recorded digest"):
        register(run_dir, address="local", path=str(db))
    assert "not verified" in show_model(db, "lora-model")


# --- register needs a completed eval (issue 17 §5) -------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "allow", "expected"),
    [
        ("no-eval-dir", False, "no completed eval in"),
        ("eval-failed-old-results-left", False, "its last eval failed"),
        ("eval-interrupted", False, "its last eval interrupted"),
        ("no-eval-dir", True, None),
        ("eval-failed-old-results-left", True, None),
        ("eval-ran", False, None),
    ],
)
def test_register_refuses_a_run_without_a_completed_eval(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, allow: bool, expected: str | None
) -> None:
    run_dir = make_run(tmp_path / "run")
    status = {"eval-failed-old-results-left": "failed", "eval-interrupted": "interrupted", "eval-ran": "ran"}
    if case == "no-eval-dir":
        shutil.rmtree(run_dir / "eval")
    else:
        manifest = {"config": {}, "stages": {"eval": {"status": status[case]}}}
        (run_dir / "run.json").write_text(json.dumps(manifest))
    db = tmp_path / "registry.db"
    flags = ["--registry.address", "local", "--registry.path", str(db)]
    code = main(["register", "-o", str(run_dir), *flags, *(["--registry.allow_no_eval", "true"] if allow else [])])
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0, err
        assert LocalRegistry(db).versions()[0]["version"] == "1.0.0"
    else:
        assert code == 2 and err.count("\n") == 1 and expected in err and "--registry.allow_no_eval" in err
        assert not db.exists() and not (run_dir / "register").exists()  # refused before anything was written


def test_the_stage_itself_refuses_without_eval_results(run_dir: Path, tmp_path: Path) -> None:
    """A compiled pipeline's register component has no run.json: the eval output decides."""
    (run_dir / "eval" / "eval_results.json").unlink()
    with pytest.raises(StageError, match="no completed eval") as err:
        register(run_dir, address="local", path=str(tmp_path / "r.db"))
    assert err.value.field == "registry.allow_no_eval"
    assert register(run_dir, address="none")["status"] == "skipped"  # nothing registered: no scores needed


_MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(_MODULES))
def test_the_same_training_is_the_same_content_whatever_peft_s_set_order(
    tmp_path_factory: pytest.TempPathFactory, order: list[str]
) -> None:
    """PEFT writes target_modules in hash-seed order: the train stage sorts it, so a retrain that gives the
    same weights is recognised as the same content (and `auto` gives it the same version)."""
    root = tmp_path_factory.mktemp("adapters")
    digests = []
    for name, modules in (("given", order), ("sorted", sorted(_MODULES))):
        adapter = root / name
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": modules}, indent=2))
        (adapter / "adapter_model.safetensors").write_bytes(b"same weights")
        canonical_adapter_config(adapter)
        assert read_json(adapter / "adapter_config.json") == {"r": 8, "target_modules": sorted(_MODULES)}
        digests.append(tree_digest(adapter))
    assert digests[0] == digests[1]
