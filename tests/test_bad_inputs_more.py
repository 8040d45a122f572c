"""No traceback reaches a user (issue 17, section 6): each case runs in-process through `cli.main` and ends in
exactly one non-empty stderr line that names the field, file or path, with exit 2 for bad input and exit 1
(the traceback in a log file) for anything unforeseen.

Classes: config files, integer bounds (every integer option), data rows, hand-edited run records, save_to_disk
metadata, compile options, eval model_args values, the local registry, the environment (full disk, read-only
paths), a chat template that raises, killed runs' temporary directories, and the error line itself.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHAT_ROWS, write_jsonl
from lora_pipeline import files
from lora_pipeline.cli import main
from lora_pipeline.config import SECTIONS, fields_of
from lora_pipeline.errors import LoraPipelineError, one_line


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run the CLI in-process; the exit code is `code` and stderr holds one line, no traceback. Returns it."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].isprintable(), lines[0]
    return lines[0]


# --- config files (-c) ------------------------------------------------------------------------------------

CONFIG_FILES: list[tuple[str, bytes | None]] = [
    ("directory", None),
    ("latin-1", b"train:\n  model: caf\xe9\n"),
    ("binary", b"\x00\xff\xfe\x00garbage"),
    ("list", b"- a\n- b\n"),
    ("scalar", b"42\n"),
    ("unclosed", b"train: {lora_r: [1\n"),
    ("tab-indent", b"train:\n\tlora_r: 4\n"),
    ("control-char", b'train: {model: "\x1b[31mred"}\n'),
    ("deep-nesting", b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n"),
    ("duplicate-anchor-alias", b"train: *missing\n"),
]


@pytest.mark.parametrize("name,content", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file(name: str, content: bytes | None, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    line = one_error(capsys, ["run", "-c", str(path), "--print_config"])
    assert "--config" in line or "train" in line


def test_config_path_with_nul(capsys) -> None:
    assert "--config" in one_error(capsys, ["run", "-c", "a\x00b.yaml"])


# --- integers: bounded at the root, for every integer option ------------------------------------------------


def _int_fields() -> list[tuple[str, int]]:
    return [
        (f"{section}.{f.name}", f.metadata["max"])
        for section in SECTIONS
        for f in fields_of(section)
        if type(f.default) is int
    ]


@pytest.mark.parametrize("name,bound", _int_fields(), ids=[n for n, _ in _int_fields()])
def test_every_integer_option_is_bounded(name: str, bound: int, capsys) -> None:
    line = one_error(capsys, ["run", f"--{name}", str(bound + 1), "--print_config"])
    assert name in line


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--train.seed", "4294967296"),
        ("--dataset.seed", "4294967296"),
        ("--train.threads", "99999999999"),
        ("--train.lora_r", "9" * 5000),
        ("--train.epochs", "1e400"),
        ("--eval.limit", str(2**64)),
    ],
)
def test_integers_out_of_range(flag: str, value: str, capsys) -> None:
    line = one_error(capsys, ["run", flag, value, "--print_config"])
    assert flag.removeprefix("--") in line
    assert len(line) < 400  # a 5,000-digit value is not echoed whole


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_int_fields()), excess=st.integers(min_value=1, max_value=2**80))
def test_integer_bound_property(field: tuple[str, int], excess: int, capsys) -> None:
    name, bound = field
    assert name in one_error(capsys, ["run", f"--{name}", str(bound + excess), "--print_config"])


# --- data rows --------------------------------------------------------------------------------------------

BAD_ROWS = [
    ("nested-1000", "[" * 1000 + "]" * 1000),
    ("nested-100-object", '{"text": ' + '{"a": ' * 100 + "1" + "}" * 100 + "}"),
    ("lone-surrogate", '{"text": "a\\ud800b"}'),
    ("surrogate-in-key", '{"text": "x", "\\udcff": 1}'),
    (
        "surrogate-in-message",
        '{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "a"}]}',
    ),
    ("integer-5000-digits", '{"text": ' + "9" * 5000 + "}"),
    ("messages-as-deep-json-text", json.dumps({"messages": "[" * 5000 + "]" * 5000})),
    ("messages-as-huge-number-text", json.dumps({"messages": "[" + "7" * 5000 + "]"})),
]


@pytest.mark.parametrize("name,line", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_row_alone_is_one_line_naming_the_row(name: str, line: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(line + "\n" + line + "\n")
    err = one_error(capsys, ["dataset", "--dataset.data_uri", str(data), "--out", str(tmp_path / "out")])
    assert "rows.jsonl:1" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,line", BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_bad_row_among_good_ones_is_a_counted_drop(name: str, line: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text(line + "\n" + "".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    assert main(["dataset", "--dataset.data_uri", str(data), "--out", str(tmp_path / "out")]) == 0
    assert "Traceback" not in capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert record["rows_valid"] == len(CHAT_ROWS)
    assert sum(d["count"] for d in record["dropped"].values()) == 1


@pytest.mark.parametrize(
    "name,text",
    [("nested", "[" * 5000 + "]" * 5000), ("huge-number", "[" + "9" * 5000 + "]")],
)
def test_bad_json_document(name: str, text: str, tmp_path: Path, capsys) -> None:
    data = tmp_path / "rows.json"
    data.write_text(text)
    assert "rows.json" in one_error(capsys, ["dataset", "--dataset.data_uri", str(data), "--out", str(tmp_path / "o")])


# --- hand-edited run records ------------------------------------------------------------------------------

RUN_JSON = [
    ("invalid-json", "{not json"),
    ("empty", ""),
    ("list", "[1, 2]"),
    ("not-utf8", "\udcff"),
    ("config-list", json.dumps({"config": [1]})),
    ("config-bad-type", json.dumps({"config": {"train": {"lora_r": "abc"}}})),
    ("config-unknown-section", json.dumps({"config": {"training": {}}})),
    ("config-unknown-option", json.dumps({"config": {"train": {"lora_rank": 4}}})),
    ("stages-list", json.dumps({"config": {}, "stages": []})),
    ("stage-entry-string", json.dumps({"config": {}, "stages": {"dataset": "ran"}})),
    ("invocations-string", json.dumps({"config": {}, "invocations": "x"})),
    ("deep", '{"config": ' + "[" * 5000 + "]" * 5000 + "}"),
]


@pytest.mark.parametrize("name,text", RUN_JSON, ids=[r[0] for r in RUN_JSON])
def test_hand_edited_run_json(name: str, text: str, tmp_path: Path, chat_file: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    line = one_error(capsys, ["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file)])
    assert "run.json" in line


STAGE_JSON = [
    ("invalid-json", "{"),
    ("list", "[]"),
    ("key-number", json.dumps({"key": 5})),
    ("not-utf8", "\udcfe"),
]


@pytest.mark.parametrize("name,text", STAGE_JSON, ids=[r[0] for r in STAGE_JSON])
def test_hand_edited_stage_json(name: str, text: str, tmp_path: Path, chat_file: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "dataset").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"config": {}, "stages": {}}))
    (run_dir / "dataset" / "stage.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    line = one_error(capsys, ["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file)])
    assert "stage.json" in line


# --- save_to_disk metadata --------------------------------------------------------------------------------

STATE_JSON = [
    ("invalid-json", "{"),
    ("list", "[]"),
    ("data-files-string", json.dumps({"_data_files": "data.arrow"})),
    ("entry-string", json.dumps({"_data_files": ["data.arrow"]})),
    ("entry-no-filename", json.dumps({"_data_files": [{}]})),
    ("filename-number", json.dumps({"_data_files": [{"filename": 3}]})),
    ("deep", '{"_data_files": ' + "[" * 5000 + "]" * 5000 + "}"),
]


@pytest.mark.parametrize("name,text", STATE_JSON, ids=[r[0] for r in STATE_JSON])
def test_bad_save_to_disk_state(name: str, text: str, tmp_path: Path, capsys) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    (saved / "state.json").write_text(text)
    line = one_error(capsys, ["dataset", "--dataset.data_uri", str(saved), "--out", str(tmp_path / "o")])
    assert "dataset.data_uri" in line and "state.json" in line


def test_bad_dataset_dict_splits(tmp_path: Path, capsys) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": "train"}))
    line = one_error(capsys, ["dataset", "--dataset.data_uri", str(saved), "--out", str(tmp_path / "o")])
    assert "dataset_dict.json" in line


# --- compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,named",
    [
        (["-o", "{tmp}"], "--output"),
        (["-o", "{tmp}/missing/pipeline.yaml"], "--output"),
        (["-o", "{tmp}/pipeline.txt"], "--output"),
        (["--component", "train", "-o", "{tmp}"], "--output"),
        (["--workspace-size", "20GB", "-o", "{tmp}/p.yaml"], "--workspace-size"),
        (["--workspace-size", "big", "-o", "{tmp}/p.yaml"], "--workspace-size"),
        (["--workspace-size=-5Gi", "-o", "{tmp}/p.yaml"], "--workspace-size"),
        (["--workspace-size", "1.5.5Gi", "-o", "{tmp}/p.yaml"], "--workspace-size"),
    ],
)
def test_bad_compile_options(args: list[str], named: str, tmp_path: Path, capsys) -> None:
    argv = ["compile", *(a.replace("{tmp}", str(tmp_path)) for a in args)]
    assert named in one_error(capsys, argv)
    assert list(tmp_path.iterdir()) == []


# --- eval.model_args values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["max_length=abc", "max_length=1.5", "max_batch_size=lots", "truncation=5", "trust_remote_code=maybe"],
)
def test_model_args_value_of_the_wrong_type(value: str, tmp_path: Path, capsys) -> None:
    line = one_error(capsys, ["eval", "-o", str(tmp_path / "run"), "--eval.model_args", value])
    assert "eval.model_args" in line and value.split("=")[0] in line


# --- the local registry -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content", [b"this is not sqlite" * 100, b"SQLite format 3\x00" + b"\xff" * 200, b"\x00" * 4096, None]
)
def test_corrupt_registry(content: bytes | None, tmp_path: Path, capsys) -> None:
    path = tmp_path / "registry.db"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    assert str(path) in one_error(capsys, ["models", "--path", str(path), "list"])


# --- the environment: a full disk, read-only paths ----------------------------------------------------------


def _raise(number: int):
    def fail(*args, **kwargs):
        raise OSError(number, os.strerror(number), str(args[-1]) if args else None)

    return fail


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_full_or_read_only_disk_during_a_stage(
    number: int, tmp_path: Path, chat_file: Path, monkeypatch, capsys
) -> None:
    run_dir = tmp_path / "run"
    assert main(["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("lora_pipeline.stages.dataset.write_json_atomic", _raise(number))
    line = one_error(capsys, ["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file), "--force"])
    assert os.strerror(number).lower() in line and "dataset.json" in line
    manifest = json.loads((run_dir / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["stages"]["dataset"]["status"] == "failed"
    assert not list(run_dir.glob(".dataset.tmp-*"))  # the partial output is gone


def test_read_only_data_output_dir(tmp_path: Path, chat_file: Path, monkeypatch, capsys) -> None:
    target = tmp_path / "ro"
    target.mkdir()
    real = files.tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == target:
            raise PermissionError(errno.EROFS, "Read-only file system", str(target))
        return real(*args, **kwargs)

    monkeypatch.setattr("lora_pipeline.preflight.tempfile.mkstemp", mkstemp)
    monkeypatch.setattr("lora_pipeline.preflight.check_model", lambda *a, **k: None)
    line = one_error(capsys, ["train", "-o", str(tmp_path / "run"), "--train.data_output_dir", str(target)])
    assert "train.data_output_dir" in line


@pytest.mark.parametrize("home", ["{file}/home", "{file}"])
def test_home_that_cannot_be_written(home: str, tmp_path: Path, monkeypatch, capsys) -> None:
    plain = tmp_path / "plain"
    plain.write_text("x")
    monkeypatch.setenv("LORA_PIPELINE_HOME", home.replace("{file}", str(plain)))
    line = one_error(capsys, ["demo", "-o", str(tmp_path / "run")])
    assert str(plain) in line


# --- a chat template that raises ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    ["{{ raise_exception('this template refuses') }}", "{% for m in messages %}", "{{ messages[0].content / 2 }}"],
)
def test_chat_template_that_raises(template: str, demo_assets, tmp_path: Path, capsys) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(demo_assets.model_dir, model)
    config_file = model / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["chat_template"] = template
    config_file.write_text(json.dumps(tokenizer_config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.json").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    assert main(["dataset", "--dataset.data_uri", str(data), "--out", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    argv = ["train", "--input", f"dataset={tmp_path / 'ds'}", "--out", str(tmp_path / "tr")]
    line = one_error(capsys, [*argv, "--train.model", str(model)])
    assert "train.model" in line and "chat template" in line


# --- killed runs' temporary directories ------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_runs_temp_dirs_are_cleaned(tmp_path: Path, chat_file: Path, monkeypatch, capsys) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmpdir))
    dead, host = _dead_pid(), files._HOST
    stale = tmpdir / f"lora-pipeline-fetch-{dead}-{host}-abc"
    live = tmpdir / f"lora-pipeline-fetch-{os.getppid()}-{host}-abc"
    other_host = tmpdir / f"lora-pipeline-fetch-{dead}-00000000-abc"
    run_dir = tmp_path / "run"
    legacy = run_dir / ".dataset.tmp-k1ll3d"
    owned = run_dir / f".dataset.tmp-{dead}-{host}-xyz"
    for d in (stale, live, other_host, legacy, owned):
        d.mkdir(parents=True)
        (d / "part").write_text("half")
    assert main(["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file)]) == 0
    assert not stale.exists() and not legacy.exists() and not owned.exists()
    assert live.exists() and other_host.exists()  # a live process's, and another machine's, are theirs


def test_stale_out_dir_temp_is_cleaned(tmp_path: Path, chat_file: Path) -> None:
    stale = tmp_path / f".out.tmp-{_dead_pid()}-{files._HOST}-q"
    stale.mkdir()
    assert main(["dataset", "--dataset.data_uri", str(chat_file), "--out", str(tmp_path / "out")]) == 0
    assert not stale.exists()


# --- the last resort, and the error line itself ---------------------------------------------------------------


def test_unforeseen_error_is_one_line_and_a_traceback_file(
    tmp_path: Path, chat_file: Path, monkeypatch, capsys
) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("something\nunforeseen\x1b[2J")

    monkeypatch.setattr("lora_pipeline.stages.dataset.write_json_atomic", boom)
    run_dir = tmp_path / "run"
    assert main(["dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file), "--force"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "\x1b" not in err
    assert "internal error: RuntimeError: something | unforeseen" in err
    log = Path(err.rsplit("traceback in ", 1)[1].strip())
    assert log.is_file() and "Traceback" in log.read_text()


def test_unforeseen_error_without_a_run_dir(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("lora_pipeline.cli._dispatch", lambda args: {}["missing"])
    assert main(["models", "list"]) == 1
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err
    assert Path(err.rsplit("traceback in ", 1)[1].strip()).parent == tmp_path / "home" / "logs"


def test_interrupt_keeps_exit_130(monkeypatch, capsys) -> None:
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("lora_pipeline.cli._dispatch", interrupt)
    assert main(["models", "list"]) == 130
    assert "interrupted" in capsys.readouterr().err


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=st.text(max_size=200))
def test_error_line_is_one_printable_line(message: str, monkeypatch, capsys) -> None:
    def fail(args):
        raise LoraPipelineError(message, field="x.y")

    monkeypatch.setattr("lora_pipeline.cli._dispatch", fail)
    assert main(["models", "list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err[:-1].isprintable()


@settings(max_examples=40, deadline=None)
@given(text=st.text())
def test_one_line_property(text: str) -> None:
    shown = one_line(text)
    assert shown.isprintable() and "\n" not in shown
    # nothing printable is lost: every printable non-space character of the input is still there, in order
    kept = [c for c in text if c.isprintable() and not c.isspace()]
    assert len(shown) >= 2000 - 3 or all(c in shown for c in kept)


def test_dataclass_fields_have_int_bounds() -> None:
    # Guards the root rule: a new integer option gets a bound without anyone remembering to add one.
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if type(f.default) is int:
                assert f.metadata["max"] <= 2**63 - 1, f"{section}.{f.name}"


@pytest.mark.parametrize("members", [{"docs/readme.txt": "x"}, {}])
def test_archive_errors_name_the_archive(members: dict[str, str], tmp_path: Path, capsys) -> None:
    import zipfile

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, text in members.items():
            zf.writestr(name, text)
    line = one_error(capsys, ["dataset", "--dataset.data_uri", str(archive), "--out", str(tmp_path / "o")])
    assert str(archive) in line and "lora-pipeline-fetch-" not in line


@pytest.mark.integration
def test_full_disk_while_checkpointing(demo_assets, tmp_path: Path, monkeypatch, capsys) -> None:
    """ENOSPC in the middle of a checkpoint: one line, run.json says failed, the partial checkpoint is gone."""
    from transformers import Trainer

    run_dir = tmp_path / "run"
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[:16])
    assert main(["dataset", "-o", str(run_dir), "--dataset.data_uri", str(data)]) == 0
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", _raise(errno.ENOSPC))
    options = {"model": demo_assets.model_dir, "epochs": 1, "effective_batch_size": 4, "max_seq_len": 128}
    options |= {"checkpoint_steps": 1, "lora_load_in_4bit": "false", "use_liger": "false"}
    flags = [item for name, value in options.items() for item in (f"--train.{name}", str(value))]
    capsys.readouterr()
    assert main(["train", "-o", str(run_dir), *flags]) == 2
    err = capsys.readouterr().err  # transformers' weight-loading bar writes to stderr too: the last line is ours
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("lora-pipeline: error:") and "no space left on device" in err
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    assert not list((run_dir / ".train.work" / "checkpoints").glob("checkpoint-*"))
    assert not (run_dir / "train").exists() and not list(run_dir.glob(".train.tmp-*"))
