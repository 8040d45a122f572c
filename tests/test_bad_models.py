"""A base model whose parts disagree, and train options that do not fit it, fail in pre-flight: exit 2, one
line naming the field and the model's path, before the dataset stage runs. Also a CSV with a duplicate
header and a column mapping that matches nothing. In-process through the CLI's entry function."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from lora_pipeline.cli import main


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | changes))

    return edit


def _edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(model / "model.safetensors")
        change(tensors)
        save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})

    return edit


def _only_tokenizer_config(model: Path) -> None:
    for name in ("tokenizer.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)


def _reshape(tensors: dict) -> None:
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:7].clone()


def _as_int(tensors: dict) -> None:
    tensors["model.norm.weight"] = tensors["model.norm.weight"].long()


def _drop_layer(tensors: dict) -> None:
    for name in [n for n in tensors if n.startswith("model.layers.1.")]:
        del tensors[name]


# (id, how the demo model is spoiled, extra flags, text the error line must contain)
MODEL_CASES = [
    ("only-tokenizer-config", _only_tokenizer_config, [], "no vocabulary file"),
    ("unknown-model-type", _edit_config(model_type="qwen9000"), [], "model_type 'qwen9000'"),
    ("vocab-beyond-embedding", _edit_config(vocab_size=100), [], "the model's embedding has 100"),
    ("config-hidden-size", _edit_config(hidden_size=64, intermediate_size=96), [], "shape"),
    ("tensor-shape", _edit_weights(_reshape), [], "model.norm.weight has shape [7]"),
    ("tensor-dtype", _edit_weights(_as_int), [], "model.norm.weight is stored as I64"),
    ("tensors-missing", _edit_weights(_drop_layer), [], "the weights lack"),
    ("rank-above-width", None, ["--train.lora_r", "65"], "train.lora_r: rank 65"),
    ("rank-far-above-width", None, ["--train.lora_r", "1000000000"], "train.lora_r"),
    ("unknown-target", None, ["--train.lora_target_modules", "q_proj,qkv"], "no module named 'qkv'"),
    ("target-typo", None, ["--train.lora_target_modules", "q_prj"], "train.lora_target_modules"),
    ("seq-len-beyond-context", None, ["--train.max_seq_len", "513"], "train.max_seq_len: 513 tokens"),
    ("seq-len-huge", None, ["--train.max_seq_len", "1000000000000"], "train.max_seq_len"),
    ("epochs-huge", None, ["--train.epochs", "1000000000000"], "train.epochs: must be <= 1000"),
    ("batch-huge", None, ["--train.effective_batch_size", "1000000000000"], "train.effective_batch_size"),
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("spoil", "flags", "expected"), [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_fails_in_preflight(demo_assets, tmp_path: Path, capsys, spoil, flags, expected) -> None:
    model = tmp_path / "model"
    shutil.copytree(demo_assets.model_dir, model)
    if spoil:
        spoil(model)
    run_dir = tmp_path / "run"
    data = demo_assets.data_file  # pre-flight fails before the dataset stage reads it
    code = main(["run", "-o", str(run_dir), "--dataset.data_uri", str(data), "--train.model", str(model), *flags])
    line = _one_error_line(capsys)
    assert code == 2
    assert expected in line
    assert line.startswith("lora-pipeline: error: train.")
    if spoil:
        assert str(model) in line
    assert not run_dir.exists()  # nothing ran


def test_spec_default_seq_len_is_clamped_to_the_context_with_one_line(demo_assets, caplog) -> None:
    from lora_pipeline.config import from_dict, validate
    from lora_pipeline.preflight import check_model_fits

    config = validate(from_dict({"train": {"model": str(demo_assets.model_dir)}}))
    assert config.train.max_seq_len == 8192
    with caplog.at_level(logging.INFO, logger="lora_pipeline"):
        check_model_fits(config)
    assert config.train.max_seq_len == 512
    assert [r.getMessage() for r in caplog.records if "max_seq_len" in r.getMessage()] == [
        "train.max_seq_len: the default 8192 is beyond the model's context; using 512"
    ]


def test_a_fitting_model_and_options_pass(demo_assets) -> None:
    from lora_pipeline.config import from_dict, validate
    from lora_pipeline.preflight import check_model_fits

    train = {"model": str(demo_assets.model_dir), "lora_r": 64, "max_seq_len": 512, "lora_target_modules": "q_proj"}
    config = validate(from_dict({"train": train}))
    check_model_fits(config)
    assert config.train.max_seq_len == 512


# (id, data file name, content, flags, text the error line must contain)
DATA_CASES = [
    ("csv-duplicate-header", "d.csv", "prompt,completion,prompt\na,b,c\n", [], "column 'prompt' twice"),
    (
        "mapping-matches-nothing",
        "d.jsonl",
        '{"prompt": "a", "completion": "b"}\n' * 4,
        ["--dataset.format", "prompt_completion", "--dataset.columns", "prompt=question"],
        "dataset.columns: prompt=question: no column 'question'",
    ),
    (
        "optional-mapping-matches-nothing",
        "d.jsonl",
        '{"instruction": "a", "output": "b"}\n' * 4,
        ["--dataset.columns", "input=context"],
        "input=context",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "flags", "expected"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES]
)
def test_bad_data_names_file_and_column(tmp_path: Path, capsys, name, content, flags, expected) -> None:
    data = tmp_path / name
    data.write_text(content)
    code = main(["dataset", "-o", str(tmp_path / "run"), "--dataset.data_uri", str(data), *flags])
    line = _one_error_line(capsys)
    assert code == 2
    assert expected in line
    if "csv" in name:
        assert name in line
