"""Register stage: what a version carries (lineage, LoRA settings, losses, scores), skipping, the local
registry's idempotence and its refusal to overwrite, and the artifact URI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lora_pipeline.config import RegistryConfig
from lora_pipeline.errors import RegistryError, StageError
from lora_pipeline.files import read_json
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
    metrics = {"train_loss": 0.5, "final_loss": 0.4, "eval_loss": 0.6, "epochs": 2, "steps": 20, "quantization": None}
    (root / "train" / "metrics.json").write_text(json.dumps(metrics))
    (root / "dataset").mkdir()
    dataset = {"source": "https://example.org/chat.jsonl?<redacted>", "sha256": SHA, "train_rows": 90, "eval_rows": 10}
    (root / "dataset" / "dataset.json").write_text(json.dumps(dataset))
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
        "train_loss": 0.5,
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
    (run_dir / "dataset" / "dataset.json").unlink()
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
    assert "eval_loss" not in meta and meta["train_loss"] == 0.5
