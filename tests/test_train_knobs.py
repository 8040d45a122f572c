"""Issue 22's knobs: max_steps, gradient checkpointing, weight_decay, eval_steps, keep-best, early stopping and
experiment trackers, each shown to take effect on a tiny demo training run."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import train_config
from lora_pipeline.config import TrainConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.training.arguments import check_train_options, trackers


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def train(demo_assets, dataset: Path, out: Path, **overrides) -> dict:
    return read_json(train_adapter(train_config(demo_assets.model_dir, **overrides), dataset, out) / "metrics.json")


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.integration
@pytest.mark.parametrize("max_steps", [4, 12])  # within the first epoch; past it (epochs=1 is overridden)
def test_max_steps_ends_the_run_after_exactly_n_steps(demo_assets, demo_dataset, tmp_path, max_steps) -> None:
    metrics = train(demo_assets, demo_dataset, tmp_path / "t", max_steps=max_steps)
    assert metrics["steps"] == max_steps
    assert max(h["step"] for h in metrics["history"]) == max_steps


@pytest.mark.integration
def test_gradient_checkpointing_is_on_in_the_model_and_leaves_the_loss(demo_assets, demo_dataset, tmp_path) -> None:
    on = train(demo_assets, demo_dataset, tmp_path / "on", gradient_checkpointing="true", max_steps=4)
    off = train(demo_assets, demo_dataset, tmp_path / "off", gradient_checkpointing="false", max_steps=4)
    assert on["gradient_checkpointing"]["applied"] is True  # read back from the model
    assert off["gradient_checkpointing"]["applied"] is False
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (on, off)]
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.integration
def test_weight_decay_reaches_the_optimizer_and_changes_the_weights(demo_assets, demo_dataset, tmp_path) -> None:
    decayed = train(demo_assets, demo_dataset, tmp_path / "wd", weight_decay=0.5, max_steps=3)
    plain = train(demo_assets, demo_dataset, tmp_path / "no", weight_decay=0.0, max_steps=3)
    assert 0.5 in decayed["weight_decay"] and plain["weight_decay"] == [0.0]
    a, b = adapter(tmp_path / "wd"), adapter(tmp_path / "no")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.integration
def test_eval_steps_evaluates_every_n_steps(demo_assets, demo_dataset, tmp_path) -> None:
    metrics = train(demo_assets, demo_dataset, tmp_path / "t", eval_steps=3)
    assert [h["step"] for h in metrics["history"] if "eval_loss" in h] == [3, 6, 9]


@pytest.mark.integration
def test_keep_best_and_early_stopping(demo_assets, demo_dataset, tmp_path) -> None:
    # A constant, too-high learning rate: the eval loss falls, then rises, so the best is not the last.
    knobs = dict(lr_scheduler="constant", learning_rate=8e-3)
    metrics = train(
        demo_assets,
        demo_dataset,
        tmp_path / "best",
        eval_steps=1,
        load_best_model_at_end=True,
        early_stopping_patience=2,
        **knobs,
    )
    evals = [(h["step"], h["eval_loss"]) for h in metrics["history"] if "eval_loss" in h]
    best = min(evals, key=lambda e: e[1])
    assert best[0] < evals[-1][0], "the setup must make the last evaluation worse than the best"
    assert metrics["stopped_early"] and metrics["steps"] == best[0] + 2 < 9  # 2 evaluations without improvement
    assert metrics["best"] == {"step": best[0], "eval_loss": best[1]} and metrics["eval_loss"] == best[1]
    # The written adapter is the one of the best step: the same run stopped there (constant LR: same trajectory).
    train(demo_assets, demo_dataset, tmp_path / "ref", max_steps=best[0], **knobs)
    saved, ref = adapter(tmp_path / "best"), adapter(tmp_path / "ref")
    assert saved.keys() == ref.keys()
    assert all(torch.allclose(saved[k], ref[k], atol=1e-6) for k in saved)


@pytest.mark.parametrize("name", ["load_best_model_at_end", "early_stopping_patience", "eval_steps"])
def test_eval_knobs_without_eval_rows_refused(name) -> None:
    cfg = TrainConfig(**{name: True if name == "load_best_model_at_end" else 2})
    with pytest.raises(ConfigError) as err:
        check_train_options(cfg, has_eval_rows=False)
    assert err.value.field == f"train.{name}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(["none"], []), ([], []), (["tensorboard,wandb"], ["tensorboard", "wandb"]), (["MLflow", "mlflow"], ["mlflow"])],
)
def test_report_to_names(value, expected) -> None:
    assert trackers(TrainConfig(report_to=value)) == expected


@pytest.mark.parametrize("value", [["comet"], ["none", "wandb"]])
def test_report_to_bad_names_refused(value) -> None:
    with pytest.raises(ConfigError) as err:
        trackers(TrainConfig(report_to=value))
    assert err.value.field == "train.report_to"


def test_missing_tracker_package_named(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb") as err:
        trackers(TrainConfig(report_to=["wandb"]))
    assert err.value.field == "train.report_to"


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """Scalars of `tag` by step, read from the TFRecord event files (length, crc, event proto, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in log_dir.rglob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                if value.tag == tag:
                    out[event.step] = value.simple_value
    return out


def logged_losses(metrics: dict) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in metrics["history"] if "loss" in h}


@pytest.mark.integration
def test_tensorboard_event_files_hold_the_losses(demo_assets, demo_dataset, tmp_path, monkeypatch) -> None:
    import tensorboardX  # noqa: F401  (the dev extra installs it: missing must fail, not skip)

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    metrics = train(demo_assets, demo_dataset, tmp_path / "t", report_to=["tensorboard"], max_steps=3)
    assert metrics["trackers"] == ["tensorboard"]
    logged = tensorboard_scalars(tmp_path / "t" / "logs", "train/loss")
    assert logged == pytest.approx(logged_losses(metrics), rel=1e-6)  # float32 in the event file


@pytest.mark.integration
def test_mlflow_store_holds_the_losses(demo_assets, demo_dataset, tmp_path, monkeypatch) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "knobs")
    monkeypatch.setenv("HF_MLFLOW_LOG_ARTIFACTS", "0")
    metrics = train(
        demo_assets, demo_dataset, tmp_path / "t", report_to=["mlflow"], max_steps=3, env_vars="API_KEY=s3cr3t"
    )
    client = mlflow.tracking.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("knobs").experiment_id])
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == pytest.approx(logged_losses(metrics), rel=1e-9)
    assert "s3cr3t" not in json.dumps(run.data.params) and "s3cr3t" not in json.dumps(metrics)


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B offline run file: a 7-byte file header, then LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    data, pos, parts, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or kind == 0:  # the rest of a block is padding
            pos += left
            continue
        parts = (b"" if kind in (1, 2) else parts) + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(parts)
    return records


@pytest.mark.integration
def test_wandb_offline_run_holds_the_losses(demo_assets, demo_dataset, tmp_path, monkeypatch) -> None:
    import wandb
    from wandb.proto import wandb_internal_pb2

    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # set in the environment: must reach no artifact
    try:
        metrics = train(demo_assets, demo_dataset, tmp_path / "t", report_to=["wandb"], max_steps=3)
    finally:
        wandb.finish()  # the run stays open for the caller to log more; the CLI's exit finishes it
        # The service process writes the run file in 32 KiB blocks and closes it only when it shuts down (at a
        # CLI's exit); finish() returns before that, so a busy machine could read a file missing its last block.
        wandb.teardown()
    (path,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    logged = {}
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record.FromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                logged[items["train/global_step"]] = items["train/loss"]
    assert logged == pytest.approx(logged_losses(metrics), rel=1e-9)
    assert "k" * 40 not in (tmp_path / "t" / "metrics.json").read_text()
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and b"k" * 40 in p.read_bytes()]


@pytest.mark.parametrize(
    "env",
    [
        "WANDB_API_KEY=abc123xyz",
        "MLFLOW_TRACKING_PASSWORD=abcdefg",
        "MLFLOW_TRACKING_TOKEN=abcdefgh",
        "MLFLOW_TRACKING_URI=https://user:pw12345@mlflow.example/",
    ],
)
def test_tracker_secrets_reach_a_cluster_only_as_kubernetes_secrets(env) -> None:

    from lora_pipeline.config import Config
    from lora_pipeline.kubeflow.secret_values import refuse_secret_values
    from lora_pipeline.redaction import redact_env_vars

    with pytest.raises(ConfigError, match="--secret-env") as err:
        refuse_secret_values(Config(train=TrainConfig(env_vars=env)))
    assert err.value.field == "train.env_vars"
    assert env.split("=", 1)[1] not in redact_env_vars(env)  # what run records hold


@pytest.mark.parametrize("env", ["WANDB_MODE=offline", "MLFLOW_TRACKING_URI=https://mlflow.example/"])
def test_tracker_settings_without_secrets_compile(env) -> None:

    from lora_pipeline.config import Config
    from lora_pipeline.kubeflow.secret_values import refuse_secret_values

    refuse_secret_values(Config(train=TrainConfig(env_vars=env)))


@pytest.mark.integration
def test_keep_best_and_early_stopping_survive_a_resume(demo_assets, demo_dataset, tmp_path, monkeypatch) -> None:
    import lora_pipeline.stages.train as train_stage
    from lora_pipeline.training.arguments import make_best_callback

    knobs = dict(
        lr_scheduler="constant", learning_rate=8e-3, eval_steps=1, load_best_model_at_end=True,
        early_stopping_patience=2, checkpoint_steps=3, checkpoint_minutes=0.0,
    )  # fmt: skip
    straight = train(demo_assets, demo_dataset, tmp_path / "straight", **knobs)

    def interrupting(cfg, work):
        callback = make_best_callback(cfg, work)
        real = callback.on_step_end

        def on_step_end(args, state, control, **kwargs):
            if state.global_step == 4:  # after checkpoint-3 and the best evaluation (step 2) were saved
                raise KeyboardInterrupt
            return real(args, state, control, **kwargs)

        callback.on_step_end = on_step_end
        return callback

    out = tmp_path / "resumed"
    monkeypatch.setattr(train_stage, "make_best_callback", interrupting)
    with pytest.raises(KeyboardInterrupt):
        train(demo_assets, demo_dataset, out, **knobs)
    monkeypatch.setattr(train_stage, "make_best_callback", make_best_callback)
    resumed = train(demo_assets, demo_dataset, out, **knobs)
    assert resumed["resumed_from_step"] == 3
    assert (resumed["best"]["step"], resumed["steps"], resumed["stopped_early"]) == (
        straight["best"]["step"], straight["steps"], True,
    )  # fmt: skip
    a, b = adapter(tmp_path / "straight"), adapter(out)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        (["--train.report_to", "comet"], "train.report_to"),
        (["--train.early_stopping_patience", "2", "--dataset.data_split", "1.0"], "train.early_stopping_patience"),
        (["--train.load_best_model_at_end", "true", "--dataset.data_split", "1.0"], "train.load_best_model_at_end"),
    ],
)
def test_cli_refuses_in_preflight_with_one_line(demo_assets, tmp_path, capsys, flags, field) -> None:
    from lora_pipeline.cli import main

    argv = ["run", "-o", str(tmp_path / "run"), "--dataset.data_uri", str(demo_assets.data_file)]
    assert main([*argv, "--train.model", str(demo_assets.model_dir), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run" / "train").exists()


@pytest.mark.parametrize(
    ("value", "expected"), [(True, "true"), (False, "false"), ("auto", "auto"), ("TRUE", None), (1, None)]
)
def test_gradient_checkpointing_from_yaml(value, expected) -> None:
    from lora_pipeline.config.loading import from_dict, validate

    if expected is None:
        with pytest.raises(ConfigError) as err:
            validate(from_dict({"train": {"gradient_checkpointing": value}}))
        assert err.value.field == "train.gradient_checkpointing"
    else:
        config = validate(from_dict({"train": {"gradient_checkpointing": value}}))
        assert config.train.gradient_checkpointing == expected


@pytest.mark.parametrize(
    ("setting", "cuda", "activations", "applied"),
    [
        ("auto", False, 900, False),  # CPU: off, whatever the estimate
        ("auto", True, 900, True),  # activations 90% of the peak
        ("auto", True, 100, False),  # 10%: recomputing would cost time for little memory
        ("true", False, 100, True),
        ("false", True, 900, False),
    ],
)
def test_gradient_checkpointing_choice(setting, cuda, activations, applied) -> None:
    from lora_pipeline.training.arguments import use_checkpointing

    estimate = {"activations": activations, "total": 1000}
    assert use_checkpointing(TrainConfig(gradient_checkpointing=setting), cuda, estimate)["applied"] is applied
