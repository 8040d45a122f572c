"""Command-line UX (issue 20, points 2 and 8): flags that are mistyped, abbreviated or missing their value
fail in one line; a continued run says what it carries over from run.json; `--help` is grouped and short."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lora_pipeline import cli
from lora_pipeline.carryover import was_demo
from lora_pipeline.cli_options import flag_name
from lora_pipeline.config import SECTIONS, fields_of, from_dict
from lora_pipeline.config.schema import HELP_GROUPS, option_group
from lora_pipeline.stages import STAGES

ALL_FLAGS = [flag_name(s, f) for s in SECTIONS for f in fields_of(s)]
NOT_BOOL = [flag_name(s, f) for s in SECTIONS for f in fields_of(s) if "bool" not in str(f.type)]


def call(argv: list[str]) -> int:
    """cli.main's exit code, whether it returns it or argparse exits with it."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = call(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- point 2: flags ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run", "--train.epoch", "3"], "unknown option --train.epoch (did you mean --train.epochs?)"),
        (
            ["run", "--train.learning", "1e-3"],
            "unknown option --train.learning (did you mean --train.learning_rate?)",  # no prefix matching
        ),
        (["train", "--train.lora_rr=3"], "unknown option --train.lora_rr (did you mean --train.lora_r?)"),
        (["eval", "--eval.taks", "x"], "unknown option --eval.taks (did you mean --eval.tasks?)"),
        (["run", "--epochs", "3"], "unknown option --epochs (did you mean --train.epochs?)"),
        (["demo", "--forse"], "unknown option --forse (did you mean --force?)"),
        (["run", "--train.epochs"], "--train.epochs needs a value"),
        (["run", "--train.epochs", "--train.lora_r", "8"], "--train.epochs needs a value"),
        (["dataset", "--dataset.data_uri"], "--dataset.data_uri needs a value"),
        (["demo", "--registry.version"], "--registry.version needs a value"),
        (["run", "-o"], "--run_dir needs a value"),
        (["trian"], "argument COMMAND: invalid choice: 'trian' (choose from {commands}); did you mean train?"),
        (["compile", "--component", "eva"], "invalid choice: 'eva' (choose from {stages}); did you mean eval?"),
    ],
)
def test_bad_flag_is_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    commands = ", ".join(
        f"'{c}'" for c in ["run", "demo", *(s.name for s in STAGES), "compile", "models", "export", "chat", "preview"]
    )
    expected = expected.format(commands=commands, stages=", ".join(f"'{s.name}'" for s in STAGES))
    assert one_error_line(capsys, argv).endswith(expected)


@pytest.mark.parametrize("flag", ALL_FLAGS)
def test_a_prefix_of_a_flag_is_refused_and_the_flag_suggested(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    line = one_error_line(capsys, ["run", flag[:-1], "1"])
    assert line.endswith(f"unknown option {flag[:-1]} (did you mean {flag}?)")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(ALL_FLAGS), at=st.integers(2, 40), char=st.sampled_from("abcdefghijklmnopqrstuvwxyz_"))
def test_a_one_letter_typo_is_refused_with_a_suggestion(capsys, flag: str, at: int, char: str) -> None:
    at = min(at, len(flag))
    for typo in (flag[:at] + char + flag[at:], flag[:at] + flag[at + 1 :], flag[:at] + char + flag[at + 1 :]):
        assume(typo not in ALL_FLAGS)
        line = one_error_line(capsys, ["run", typo, "1"])
        assert line.startswith(f"lora-pipeline: error: unknown option {typo} (did you mean --"), line


@pytest.mark.parametrize("flag", NOT_BOOL)
def test_every_flag_without_its_value_says_so(capsys: pytest.CaptureFixture[str], flag: str) -> None:
    assert one_error_line(capsys, ["run", flag]).endswith(f"{flag} needs a value")


def test_a_bare_boolean_flag_means_true(capsys: pytest.CaptureFixture[str], chat_file: Path) -> None:
    argv = ["run", "--dataset.data_uri", str(chat_file), "--train.save_epoch", "--print_config"]
    assert call(argv) == 0
    assert "save_epoch: true" in capsys.readouterr().out


# --- point 2: options carried over from run.json ------------------------------------------------------


def record_run(run_dir: Path, layer: dict, command: str = "run", demo: bool = False) -> Path:
    """A run directory as a finished run leaves it, as far as the next command reads it."""
    run_dir.mkdir(parents=True)
    invocation = {"command": command, "demo": demo, "config_files": [], "overrides": {}}
    record = {"config": from_dict(layer).to_dict(), "invocations": [invocation], "stages": {}}
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


def printed_config(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, list[str]]:
    assert call([*argv, "--print_config"]) == 0
    captured = capsys.readouterr()
    return captured.out, [line for line in captured.err.splitlines() if "run.json" in line]


@pytest.mark.parametrize(
    ("extra", "epochs", "line"),
    [
        ([], 3, "carried over from {run}/run.json: dataset.data_uri={data}, train.epochs=3 (--fresh drops them)"),
        (["--train.epochs", "5"], 5, "carried over from {run}/run.json: dataset.data_uri={data} (--fresh drops them)"),
        (
            ["--fresh", "--dataset.data_uri", "{data}"],
            2,
            "--fresh: not carried over from {run}/run.json: train.epochs=3",
        ),  # noqa: E501
    ],
)
def test_continued_run_names_what_it_carries_over(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, chat_file: Path, extra: list[str], epochs: int, line: str
) -> None:
    run = record_run(tmp_path / "run", {"dataset": {"data_uri": str(chat_file)}, "train": {"epochs": 3}})
    extra = [arg.format(data=chat_file) for arg in extra]
    out, lines = printed_config(capsys, ["run", "-o", str(run), *extra])
    assert f"epochs: {epochs}\n" in out
    assert lines == [f"lora-pipeline: {line.format(run=run, data=chat_file)}"]


def test_nothing_to_carry_over_prints_nothing(capsys: pytest.CaptureFixture[str], tmp_path: Path, chat_file) -> None:
    run = record_run(tmp_path / "run", {"dataset": {"data_uri": str(chat_file)}})
    assert printed_config(capsys, ["run", "-o", str(run), "--dataset.data_uri", str(chat_file)])[1] == []


@pytest.fixture
def demo_home(demo_assets, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = Path(demo_assets.model_dir).parents[1]  # the session's LORA_PIPELINE_HOME
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(home))
    return home


def demo_run(tmp_path: Path, train: dict) -> Path:
    from lora_pipeline.demo import demo_config

    layer = demo_config()
    layer["train"].update(train)
    return record_run(tmp_path / "demo", layer, command="demo", demo=True)


def test_plain_demo_is_the_demo_as_shipped(capsys, tmp_path: Path, demo_home: Path) -> None:
    from lora_pipeline.demo import DEMO_OVERRIDES

    run = demo_run(tmp_path, {"epochs": 3})
    out, lines = printed_config(capsys, ["demo", "-o", str(run)])
    assert f"epochs: {DEMO_OVERRIDES['train']['epochs']}\n" in out
    assert lines == [
        f"lora-pipeline: not carried over from {run}/run.json: train.epochs=3 "
        "(the demo runs as shipped: give them again to keep them)"
    ]


def test_a_stage_on_a_demo_run_names_only_what_differs_from_the_demo(capsys, tmp_path: Path, demo_home) -> None:
    run = demo_run(tmp_path, {"epochs": 3, "lora_r": 4})
    out, lines = printed_config(capsys, ["eval", "-o", str(run), "--train.lora_r", "8"])
    assert "epochs: 3\n" in out and "lora_r: 8\n" in out
    assert lines == [f"lora-pipeline: carried over from {run}/run.json: train.epochs=3 (--fresh drops them)"]


@pytest.mark.parametrize(
    ("invocations", "expected"),
    [
        ([{"command": "demo"}], True),  # recorded before invocations said "demo"
        ([{"command": "run", "demo": True}], True),
        ([{"command": "run", "demo": False}, {"command": "eval"}], False),
        ([], False),
    ],
)
def test_was_demo(tmp_path: Path, invocations: list, expected: bool) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"config": {}, "invocations": invocations}))
    assert was_demo(tmp_path) is expected


# --- point 8: help ---------------------------------------------------------------------------------------

# Lines at 80 columns before the groups (all 4 sections on every command, KFP names inline, each help in a
# column of its own): run 302, demo 302, dataset 306, train 306, eval 306, register 307. After: run 179,
# demo 178, dataset 51, train 116, eval 53, register 51; the bounds leave room for options added since
# (sources, chat template, registry, training knobs).
HELP_LINES = {"run": 240, "demo": 240, "dataset": 80, "train": 160, "eval": 70, "register": 70}


def help_text(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    assert call([*argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("command", "most"), HELP_LINES.items())
def test_help_length_is_bounded(capsys, monkeypatch, command: str, most: int) -> None:
    lines = help_text(capsys, monkeypatch, command, "--help").splitlines()
    assert len(lines) <= most


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_stage_help_shows_its_own_options_and_the_shared_ones(capsys, monkeypatch, stage) -> None:
    text = help_text(capsys, monkeypatch, stage.name, "--help")
    for flag in ALL_FLAGS:
        assert (flag in text) == flag.startswith(f"--{stage.section}."), flag
    for shared in ("--config", "--run_dir", "--fresh", "--force", "--print_config", "--out", "--help-kfp"):
        assert shared in text
    assert "run --help` lists them all" in " ".join(text.split())


def test_every_option_appears_in_some_help(capsys, monkeypatch) -> None:
    commands = ["run", "demo", "compile", *(s.name for s in STAGES)]
    seen = "".join(help_text(capsys, monkeypatch, c, "--help") for c in commands)
    assert [flag for flag in ALL_FLAGS if flag not in seen] == []


def sections_of(text: str) -> dict[str, list[str]]:
    """argparse's help as {group title: the flags under it}."""
    out: dict[str, list[str]] = {}
    for block in text.split("\n\n"):
        title, _, body = block.partition(":\n")
        out[title.strip()] = re.findall(r"^  (--[\w.]+)", body, flags=re.MULTILINE)
    return out


def test_run_help_groups_follow_the_schema(capsys, monkeypatch) -> None:
    groups = sections_of(help_text(capsys, monkeypatch, "run", "--help"))
    titles = [title for _, title in HELP_GROUPS.values()]
    assert [t for t in groups if t in titles] == titles  # every group, in order
    for key, (_, title) in HELP_GROUPS.items():
        expected = [flag_name(s, f) for s in SECTIONS for f in fields_of(s) if option_group(s, f) == key]
        assert groups[title] == expected and expected
    k8s = HELP_GROUPS["kubernetes"][1]
    assert "Kubernetes only" in k8s
    applies = [flag_name(s, f) for s in SECTIONS for f in fields_of(s) if f.metadata.get("applies") == "kubernetes"]
    assert groups[k8s] == applies


def test_demo_help_does_not_call_data_uri_required(capsys, monkeypatch) -> None:
    demo = " ".join(help_text(capsys, monkeypatch, "demo", "--help").split())
    assert "REQUIRED" not in demo and "(default: the demo's data)" in demo
    assert "--train.epochs INT Number of training epochs. LoRA typically needs 2-3 (default: 10)" in demo
    assert "[REQUIRED]" in help_text(capsys, monkeypatch, "run", "--help")


@pytest.mark.parametrize("command", ["run", "train", "eval", "compile"])
def test_help_kfp_is_a_table_of_spec_names(capsys, monkeypatch, command: str) -> None:
    rows = [line.split() for line in help_text(capsys, monkeypatch, command, "--help-kfp").splitlines()]
    assert rows[0] == ["option", "KFP", "pipeline", "parameter", "component", "input"]
    section = {"train": "train", "eval": "eval"}.get(command)
    expected = [
        [flag_name(s, f), f.metadata.get("kfp", "-"), f.metadata.get("component", "-")]
        for s in SECTIONS
        for f in fields_of(s)
        if ("kfp" in f.metadata or "component" in f.metadata) and section in (None, s)
    ]
    assert rows[1:] == expected


def test_fresh_drops_the_recorded_options_and_the_cache_key_decides(capsys, tmp_path: Path, chat_file: Path) -> None:
    run, data = tmp_path / "run", ["--dataset.data_uri", str(chat_file)]
    assert call(["dataset", "-o", str(run), *data, "--dataset.seed", "7"]) == 0
    capsys.readouterr()
    assert call(["dataset", "-o", str(run)]) == 0  # the recorded seed: cached
    assert json.loads((run / "run.json").read_text())["stages"]["dataset"]["status"] == "cached"
    assert "dataset.seed=7 (--fresh drops them)" in capsys.readouterr().err
    assert call(["dataset", "-o", str(run), "--fresh", *data]) == 0  # the default seed: another key, so it runs
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["dataset"]["seed"] == 42 and record["stages"]["dataset"]["status"] == "ran"
    assert f"--fresh: not carried over from {run}/run.json: dataset.seed=7" in capsys.readouterr().err
