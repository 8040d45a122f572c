"""The command line: help lists every parameter with its spec name; bad input is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_exit_code, run_cli
from lora_pipeline.cli_options import flag_name
from lora_pipeline.config import SECTIONS, fields_of, kfp_parameters


@pytest.mark.integration
def test_run_help_lists_every_parameter_with_default_and_spec_name() -> None:
    out = run_cli("run", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for section in SECTIONS:
        for f in fields_of(section):
            assert flag_name(section, f) in text
    assert "Rank of the low-rank matrices (4, 8, 16, 32, 64) (default: 16)" in text
    kfp = run_cli("run", "--help-kfp").stdout  # the spec's names: a table of their own
    for kfp_name in kfp_parameters():
        assert kfp_name in kfp
    assert "--train.lora_r" in kfp and "phase_02_train_man_lora_r" in kfp and "training_lora_r" in kfp
    assert "training_lora_bnb_4bit_quant_type" in kfp


@pytest.mark.integration
def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from lora_pipeline import cli; "
        "cli.build_parser().format_help(); "
        "heavy = {'torch', 'transformers', 'peft', 'lm_eval', 'datasets'} & set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--train.lora_rr", "3"], "--train.lora_rr"),
        (["--train.lora_r", "abc"], "train.lora_r"),
        (["--train.lora_r", "0"], "train.lora_r"),
        (["--dataset.data_split", "1.5"], "dataset.data_split"),
        (["--train.lora_load_in_4bit", "true", "--train.lora_load_in_8bit", "true"], "train.lora_load_in_8bit"),
        (["--dataset.data_uri", "/no/such/data.jsonl"], "dataset.data_uri"),
        (["--registry.version", "v1"], "registry.version"),
        (["--eval.tasks", ""], "eval.tasks"),
        ([], "dataset.data_uri"),  # required, and no demo asked for
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], field: str, tmp_path: Path, capsys) -> None:
    code = cli_exit_code(["run", "-o", str(tmp_path / "run"), *args])
    stderr = capsys.readouterr().err
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert field in lines[0]
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_yaml_unknown_key_and_bad_yaml(tmp_path: Path, capsys) -> None:
    (tmp_path / "a.yaml").write_text("train:\n  lora_r: 8\n  lora_rank: 4\n")
    assert cli_exit_code(["run", "-c", str(tmp_path / "a.yaml")]) == 2
    assert "train.lora_rank: unknown option" in capsys.readouterr().err
    (tmp_path / "b.yaml").write_text("train: [unclosed\n")
    assert cli_exit_code(["run", "-c", str(tmp_path / "b.yaml")]) == 2
    stderr = capsys.readouterr().err
    assert "not valid YAML" in stderr and len(stderr.splitlines()) == 1
    assert cli_exit_code(["run", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.integration
def test_yaml_then_flags_override(tmp_path: Path, chat_file: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"dataset:\n  data_uri: {chat_file}\ntrain:\n  lora_r: 8\n  lora_alpha: 16\n")
    out = run_cli("run", "-c", str(tmp_path / "c.yaml"), "--train.lora_r", "4", "--print_config")
    assert out.returncode == 0, out.stderr
    assert "lora_r: 4\n" in out.stdout and "lora_alpha: 16\n" in out.stdout
    assert f"data_uri: {chat_file}" in out.stdout


@pytest.mark.integration
def test_bare_boolean_flag_means_true(tmp_path: Path, chat_file: Path) -> None:
    out = run_cli("run", "--dataset.data_uri", str(chat_file), "--train.save_epoch", "--print_config")
    assert "save_epoch: true" in out.stdout


@pytest.mark.integration
def test_dataset_subcommand_writes_into_run_dir(tmp_path: Path, chat_file: Path) -> None:
    out = run_cli("dataset", "-o", str(tmp_path / "run"), "--dataset.data_uri", str(chat_file))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "dataset" / "train.jsonl").exists()
    assert (tmp_path / "run" / "run.json").exists()
    again = run_cli("dataset", "-o", str(tmp_path / "run"), "--dataset.data_uri", str(chat_file))
    assert "cached" in again.stdout + again.stderr


def test_train_without_dataset_is_one_line(tmp_path: Path, demo_assets, capsys) -> None:
    model = str(demo_assets.model_dir)
    argv = ["train", "-o", str(tmp_path / "run"), "--train.lora_load_in_4bit", "false", "--train.model", model]
    assert cli_exit_code(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines()[-1].startswith("lora-pipeline: error: train: no train.jsonl")
    assert "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # a run directory in which nothing completed is not left behind


@pytest.mark.integration
def test_stage_commands_take_explicit_inputs_and_output(tmp_path: Path, chat_file: Path, demo_assets) -> None:
    data, train = tmp_path / "data", tmp_path / "train"
    out = run_cli("dataset", "--dataset.data_uri", str(chat_file), "--out", str(data))
    assert out.returncode == 0, out.stderr
    assert (data / "train.jsonl").exists() and not (tmp_path / "run.json").exists()
    flags = ["--train.model", str(demo_assets.model_dir), "--train.lora_load_in_4bit", "false"]
    flags += ["--train.effective_batch_size", "8", "--train.epochs", "1", "--train.use_liger", "false"]
    out = run_cli("train", "--input", f"dataset={data}", "--out", str(train), *flags)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (train / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "data", "train"]  # no lock or work left


@pytest.mark.integration
def test_console_command_keeps_exit_code_output_and_exit_handlers(tmp_path: Path) -> None:
    """`run` skips the interpreter's teardown, but not the exit code, buffered output or atexit handlers."""
    marker = tmp_path / "atexit-ran"
    code = (
        "import atexit, sys, torch; from lora_pipeline import cli; "
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes')); "
        "print('buffered before exit', end=''); "
        "sys.argv = ['lora-pipeline', 'run', '--train.epochs', '0']; cli.run()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "buffered before exit"
    assert out.stderr.count("\n") == 1 and "train.epochs" in out.stderr
    assert marker.read_text() == "yes"
