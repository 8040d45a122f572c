"""Bad inputs found by exploring the CLI as a hostile user, beyond the listed ones (test_bad_inputs*.py): each
case runs in-process through `cli.main` and ends in one stderr line naming the field, file or path, exit 2.

Classes: YAML config files (duplicate keys, non-text keys and values), long text in error lines (the URI
scrubber), path flags (empty, NUL) and conflicting stage flags, data files that are FIFOs or devices, the registry
address, compile flags that apply only with --trainjob, broken adapter files (chat, export, eval), chat
sampling bounds, export --private without --push-to-hub, a stage's own JSON files edited by hand.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHAT_ROWS, cli_exit_code, write_jsonl
from lora_pipeline.cli import main
from lora_pipeline.redaction import _URI_START, _uri_starts, scrub


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    """Run the CLI in-process; the exit code is `code` and stderr holds one line, no traceback. Returns it."""
    assert cli_exit_code(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "internal error" not in err, err
    assert len(lines) == 1, err
    assert lines[0].isprintable(), lines[0]
    return lines[0]


# --- YAML config files --------------------------------------------------------------------------------------

CONFIGS: list[tuple[str, str, str]] = [  # name, YAML, what the line names
    ("duplicate-option", "train:\n  lora_r: 4\n  lora_alpha: 8\n  lora_r: 64\n", "'lora_r' given twice, at line 4"),
    ("duplicate-section", "train: {lora_r: 4}\neval: {limit: 2}\ntrain: {lora_r: 8}\n", "'train' given twice"),
    ("duplicate-in-flow", "eval: {gen_kwargs: {temperature: 0, temperature: 1}}\n", "'temperature' given twice"),
    ("integer-option-name", "train: {1: 2}\n", "train.1: unknown option"),
    ("null-section-name", "~: {lora_r: 4}\n", "None: unknown section"),
    ("binary-text", "train: {model: !!binary aGVsbG8=}\n", "train.model: expected a string"),
    ("set-text", "train: {model: !!set {a: null}}\n", "train.model: expected a string"),
]


@pytest.mark.parametrize("name,text,named", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bad_yaml_config(name: str, text: str, named: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    line = one_error(capsys, ["run", "-c", str(path), "--print_config"])
    assert named in line


@pytest.mark.parametrize(
    "text,shown",
    [
        ("base: &b {lora_r: 4}\n", None),  # an anchor alone is still an unknown section
        ("registry: {description: 2024-05-01}\n", "description: '2024-05-01'"),  # a YAML date is text here
        ("registry: {format_version: 2.0}\n", "format_version: '2.0'"),
    ],
)
def test_yaml_values_that_stay_accepted(text: str, shown: str | None, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    code = main(["run", "-c", str(path), "--print_config"])
    out = capsys.readouterr().out
    assert code == (0 if shown else 2)
    if shown:
        assert shown in out


def test_merge_key_still_overrides(tmp_path: Path, capsys) -> None:
    """`<<: *anchor` then the same key: YAML's override, not a duplicate."""
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  <<: {lora_r: 4, lora_alpha: 8}\n  lora_r: 16\n")
    assert main(["run", "-c", str(path), "--print_config"]) == 0
    assert re.search(r"lora_r: 16\b", capsys.readouterr().out)


# --- long text in error lines --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="aZ9+.-:/@ _x", max_size=60))
def test_uri_starts_match_the_regex(text: str) -> None:
    """The linear scan finds the URIs the regex finds (the regex, tried at each position, is quadratic)."""
    assert list(_uri_starts(text)) == [m.start() for m in _URI_START.finditer(text)]


def test_long_config_value_is_printed_not_hung(tmp_path: Path, capsys) -> None:
    """A 1 MB option value goes through the scrubber (print_config, error lines) in one pass: before, each
    position of a long run of letters restarted the URI regex (2 MB: hours)."""
    path = tmp_path / "cfg.yaml"
    path.write_text("train: {model: '" + "a" * 1_000_000 + "'}\n")
    assert main(["run", "-c", str(path), "--print_config"]) == 0
    assert scrub("x" * 500_000 + " https://u:p@h/k") == "x" * 500_000 + " https://<redacted>@h/k"


# --- path flags and conflicting stage flags ------------------------------------------------------------------

PATH_FLAGS: list[list[str]] = [  # each command's path flags; BAD is where the bad value goes
    ["run", "--demo", "-o", "BAD"],
    ["demo", "-o", "BAD"],
    ["dataset", "--dataset.data_uri", "x.jsonl", "--out", "BAD"],
    ["train", "--out", "o", "--input", "BAD"],
    ["run", "-c", "BAD"],
    ["export", "-o", "BAD"],
    ["export", "-o", "run", "--out", "BAD"],
    ["chat", "-o", "BAD"],
    ["preview", "-o", "BAD"],
    ["compile", "-o", "BAD"],
    ["models", "--path", "BAD", "list"],
]


@pytest.mark.parametrize("bad", ["", "a\x00b", "dataset=a\x00b"])
@pytest.mark.parametrize("argv", PATH_FLAGS, ids=[" ".join(a) for a in PATH_FLAGS])
def test_empty_or_nul_path_flag(argv: list[str], bad: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """`-o ""` was "not given" (the demo ran into runs/demo), a NUL an internal error: both refused at parse."""
    monkeypatch.chdir(tmp_path)
    line = one_error(capsys, [bad if a == "BAD" else a for a in argv])
    assert argv[argv.index("BAD") - 1] in line and f": not a path: {bad!r}" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,named",
    [
        (["dataset", "--dataset.data_uri", "x.jsonl", "--out", "a", "-o", "b"], "-o: give -o"),
        (["train", "--input", "dataset=.", "-o", "b"], "--input: only with --out"),
    ],
)
def test_conflicting_stage_flags(argv: list[str], named: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """-o next to --out was ignored without a word, and --input without --out too."""
    monkeypatch.chdir(tmp_path)
    assert named in one_error(capsys, argv)
    assert list(tmp_path.iterdir()) == []


# --- data files that are not regular files -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
@pytest.mark.parametrize("option", ["--dataset.data_uri", "--dataset.source", "--dataset.eval_uri"])
def test_data_file_that_is_not_a_regular_file(kind: str, option: str, tmp_path: Path, capsys) -> None:
    """A FIFO named data.jsonl hung the dataset stage (read for the fingerprint, then again for the rows);
    a link to /dev/zero read forever."""
    path = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    good = tmp_path / "good.jsonl"
    write_jsonl(good, CHAT_ROWS)
    argv = ["dataset", option, str(path), "--out", str(tmp_path / "out")]
    if option == "--dataset.eval_uri":
        argv += ["--dataset.data_uri", str(good)]
    line = one_error(capsys, argv)
    assert f"not a regular file (a FIFO, device or socket): {path}" in line


# --- registry address, compile flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address,shown",
    [
        ("http://[::1", "not a valid URL: 'http://[::1'"),  # was an internal error in pre-flight
        ("http://host:abc", "not a valid URL"),
        ("ftp://host", "expected http://host or https://host"),  # was reached as host:8080
        ("s3://bucket", "expected http://host or https://host"),
        ("https://", "no host in 'https://'"),
        (":8080", "no host in ':8080'"),
    ],
)
def test_bad_registry_address(address: str, shown: str, tmp_path: Path, capsys) -> None:
    line = one_error(capsys, ["register", "-o", str(tmp_path / "run"), "--registry.address", address, "--print_config"])
    assert line.endswith(f"registry.address: {shown}") or f"registry.address: {shown}" in line


@pytest.mark.parametrize("address", ["model-registry.kubeflow.svc:8080", "http://[::1]:9", "https://h/", "Local"])
def test_good_registry_address_still_accepted(address: str, tmp_path: Path, capsys) -> None:
    assert main(["register", "-o", str(tmp_path / "run"), "--registry.address", address, "--print_config"]) == 0


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--component", "train", "--trainjob"], "--trainjob: writes the TrainJob"),
        *[([f"--{dest.replace('_', '-')}", "7"], f"--{dest.replace('_', '-')}: applies only with --trainjob")
          for dest in ("name", "namespace", "runtime", "pvc", "dataset_dir", "output_dir", "timeout")],
        (["--submit"], "--submit: applies only with --trainjob"),
        (["--dry-run"], "--dry-run: applies only with --trainjob"),
    ],
)  # fmt: skip
def test_trainjob_flags_without_trainjob(flags: list[str], named: str, tmp_path: Path, capsys) -> None:
    """They were ignored without a word when compiling the pipeline (or a component)."""
    out = tmp_path / "p.yaml"
    assert named in one_error(capsys, ["compile", "-o", str(out), *flags])
    assert not out.exists()


def test_trainjob_only_defaults_match_the_parser() -> None:
    from lora_pipeline.cli import build_parser
    from lora_pipeline.kubeflow.command import TRAINJOB_ONLY

    args = build_parser().parse_args(["compile"])
    assert {dest: getattr(args, dest) for dest in TRAINJOB_ONLY} == TRAINJOB_ONLY


# --- a run's adapter files, chat and export options -------------------------------------------------------

ADAPTERS: list[tuple[str, str, bytes | None, str]] = [  # name, adapter_config.json, weights, what the line says
    ("config-truncated", "{", None, "adapter_config.json: not a readable adapter config"),
    ("config-list", "[]", None, "adapter_config.json: no base_model_name_or_path"),
    ("config-no-base", "{}", None, "adapter_config.json: no base_model_name_or_path"),
    ("config-base-number", '{"base_model_name_or_path": 3}', None, "no base_model_name_or_path"),
    ("weights-truncated", '{"base_model_name_or_path": "m"}', b"xx", "adapter_model.safetensors: not a readable"),
    ("weights-garbage", '{"base_model_name_or_path": "m"}', b"\xff" * 64, "adapter_model.safetensors: not a readable"),
]


@pytest.mark.parametrize("command", ["chat", "export"])
@pytest.mark.parametrize("name,config,weights,shown", ADAPTERS, ids=[a[0] for a in ADAPTERS])
def test_broken_adapter_files(
    command: str, name: str, config: str, weights: bytes | None, shown: str, tmp_path: Path, capsys
) -> None:
    """A truncated or hand-edited adapter was an internal error inside peft / safetensors."""
    adapter = tmp_path / "run" / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(config)
    if weights is not None:
        (adapter / "adapter_model.safetensors").write_bytes(weights)
    extra = ["--prompt", "hi"] if command == "chat" else ["--merged", "--out", str(tmp_path / "exp")]
    line = one_error(capsys, [command, "-o", str(tmp_path / "run"), *extra])
    assert f"-o: {adapter}/" in line and shown in line


@pytest.mark.parametrize(
    "flags,shown",
    [
        (["--temperature", "inf"], "--temperature: must be 0 (greedy) to 100"),
        (["--temperature", "1e308"], "--temperature: must be 0 (greedy) to 100"),
        (["--max_new_tokens", "999999999999"], "--max_new_tokens: must be at most 32768"),  # generated for hours
    ],
)
def test_chat_sampling_bounds(flags: list[str], shown: str, tmp_path: Path, capsys) -> None:
    assert shown in one_error(capsys, ["chat", "-o", str(tmp_path), "--prompt", "hi", *flags])


def test_export_private_without_push(tmp_path: Path, capsys) -> None:
    """--private was ignored without a word when nothing was pushed."""
    adapter = tmp_path / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "m"}')
    assert "--private: applies only with --push-to-hub" in one_error(
        capsys, ["export", "-o", str(tmp_path), "--merged", "--private"]
    )


# --- a stage's own JSON files, edited by hand ------------------------------------------------------------

RECORDS: list[tuple[str, bytes, str]] = [
    ("list", b"[1]", "metrics.json: expected a JSON object, got list"),
    ("truncated", b'{"final_loss": 1', "metrics.json: not valid JSON"),
    ("not-utf8", b"\xff\xfe{}", "metrics.json: not valid JSON"),
    ("deep", b"[" * 5000 + b"]" * 5000, "metrics.json: not valid JSON"),
]


@pytest.mark.parametrize("name,content,shown", RECORDS, ids=[r[0] for r in RECORDS])
def test_hand_edited_train_metrics(name: str, content: bytes, shown: str, tmp_path: Path, capsys) -> None:
    """train/metrics.json as a list was an internal error (AttributeError) in the register stage."""
    train, evaluated = tmp_path / "train", tmp_path / "eval"
    (train / "adapter").mkdir(parents=True)
    evaluated.mkdir()
    (train / "adapter" / "adapter_config.json").write_text('{"base_model_name_or_path": "m"}')
    (train / "metrics.json").write_bytes(content)
    (evaluated / "eval_results.json").write_text('{"comparison": []}')
    argv = ["register", "--input", f"train={train}", "--input", f"eval={evaluated}", "--out", str(tmp_path / "o")]
    line = one_error(capsys, [*argv, "--registry.address", "local", "--registry.path", str(tmp_path / "r.db")])
    assert f"{train}/{shown}" in line


@pytest.mark.parametrize(
    "text,shown",
    [("{bad\n", "rows.jsonl:1: not valid JSON"), ('{"a": 1}\n\n[1]\n', "rows.jsonl:3: expected a JSON object")],
)
def test_read_jsonl_names_the_row(text: str, shown: str, tmp_path: Path) -> None:
    """What the train stage reads of the dataset stage's rows: a hand-edited row is named (was an internal
    error, JSONDecodeError); still a ValueError for the callers that handle a bad file themselves."""
    from lora_pipeline.errors import DataError
    from lora_pipeline.files import read_jsonl

    (tmp_path / "rows.jsonl").write_text(text)
    with pytest.raises(DataError, match=re.escape(shown)) as err:
        read_jsonl(tmp_path / "rows.jsonl")
    assert isinstance(err.value, ValueError)
