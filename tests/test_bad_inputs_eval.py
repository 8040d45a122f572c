"""Bad eval and registry options found in pre-flight, before a `run` trains: one line naming the option, exit
2, and no stage output. Classes: lm-eval tasks that cannot be built (a hub dataset offline, an invalid task
YAML, a split the data lacks, empty data), the run's own `split` task with no held-out rows, model_args /
gen_kwargs values that lm-eval would only trip over once the models are loaded, a task listed twice, registry
names with control characters, a CA bundle that is not one; preview and chat on run directories in odd states."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import FLOATS
from lora_pipeline.carryover import describe
from lora_pipeline.cli import main
from lora_pipeline.config import Config, EvalConfig, RegistryConfig, validate
from lora_pipeline.errors import ConfigError
from lora_pipeline.evaluation.values import GEN_KWARG_RULES, MODEL_ARG_RULES, value_problem
from lora_pipeline.preflight import check_ca_cert
from lora_pipeline.stages.evaluate import check_eval_options

TASK_BODY = """output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: [animal, fruit]
doc_to_target: 0
"""

# (name, YAML after `task: <name>`, what the error says)
BROKEN_TASKS = [
    ("offline_hub", "dataset_path: someone/not_cached_xyz\ntest_split: test\n" + TASK_BODY, "not_cached_xyz"),
    (
        "bad_type",
        "dataset_path: json\ndataset_kwargs: {data_files: {test: DATA}}\ntest_split: test\n"
        + TASK_BODY.replace("multiple_choice", "no_such_type"),
        "no_such_type",
    ),
    (
        "bad_field",
        "dataset_path: json\ndataset_kwargs: {data_files: {test: DATA}}\ntest_split: test\n"
        + TASK_BODY.replace("{{question}}", "{{no_such_field}}"),
        "no_such_field",
    ),
    (
        "no_split",
        "dataset_path: json\ndataset_kwargs: {data_files: {test: DATA}}\ntest_split: validation\n" + TASK_BODY,
        "no 'validation' in the task's data",
    ),
    (
        "empty_data",
        "dataset_path: json\ndataset_kwargs: {data_files: {test: EMPTY}}\ntest_split: test\n" + TASK_BODY,
        "has no rows",
    ),
]


def run_argv(demo_assets, out: Path, *flags: str) -> list[str]:
    return [
        "run",
        "-o",
        str(out),
        f"--dataset.data_uri={demo_assets.data_file}",
        "--dataset.subset=32",
        f"--train.model={demo_assets.model_dir}",
        "--train.max_steps=1",
        "--eval.limit=2",
        "--registry.address=none",
        *flags,
    ]


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name,body,says", BROKEN_TASKS, ids=[t[0] for t in BROKEN_TASKS])
def test_a_task_that_cannot_be_built_fails_before_training(
    name: str, body: str, says: str, demo_assets, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = demo_assets.task_dir / f"{demo_assets.task_name}_test.jsonl"
    (tasks / "empty.jsonl").write_text("")
    body = body.replace("DATA", str(data)).replace("EMPTY", str(tasks / "empty.jsonl"))
    (tasks / f"{name}.yaml").write_text(f"task: {name}\n" + body)
    out = tmp_path / "run"
    line = one_error(capsys, run_argv(demo_assets, out, f"--eval.include_path={tasks}", f"--eval.tasks={name}"))
    assert "eval.tasks" in line and name in line and says in line, line
    assert not (out / "train").exists()


def test_split_task_without_held_out_rows_fails_before_training(demo_assets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    line = one_error(capsys, run_argv(demo_assets, out, "--eval.tasks=split", "--dataset.data_split=1.0"))
    assert "eval.tasks" in line and "data_split" in line, line
    assert not (out / "train").exists()


BAD_VALUES = [
    ("model_args", "max_length=-5"),
    ("model_args", "max_length=0"),
    ("model_args", "max_batch_size=0"),
    ("model_args", "dtype=notadtype"),
    ("model_args", "device=nosuch"),
    ("model_args", "backend=seq2seq"),
    ("gen_kwargs", "temperature=hot"),
    ("gen_kwargs", "temperature=-1"),
    ("gen_kwargs", "until=5"),
    ("gen_kwargs", "do_sample=maybe"),
    ("gen_kwargs", "top_p=5"),
    ("gen_kwargs", "top_k=abc"),
    ("gen_kwargs", "num_beams=0"),
]


@pytest.mark.parametrize("option,value", BAD_VALUES)
def test_bad_value_fails_before_training(option: str, value: str, demo_assets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    line = one_error(capsys, run_argv(demo_assets, out, "--eval.tasks=split", f"--eval.{option}={value}"))
    assert f"eval.{option}" in line and value.split("=")[0] in line, line
    assert not (out / "train").exists()


def test_good_values_pass() -> None:
    check_eval_options(
        EvalConfig(
            tasks=["split"],
            backend="hf",
            model_args={"dtype": "bfloat16", "device": "cuda:1", "max_length": 64},
            gen_kwargs={"temperature": 0, "until": ["\n"], "top_p": 0.9, "do_sample": False, "top_k": 0},
        )
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rules=st.sampled_from([MODEL_ARG_RULES, GEN_KWARG_RULES]),
    data=st.data(),
    value=st.one_of(st.text(max_size=8), st.integers(), FLOATS, st.booleans(), st.lists(st.integers())),
)
def test_a_value_a_rule_refuses_is_one_config_error(rules, data, value) -> None:
    """Whatever the value, the check answers with a line naming the key, or lets it through; never raises."""
    key = data.draw(st.sampled_from(sorted(rules)))
    problem = value_problem(rules, key, value)
    if problem is None:
        return
    assert problem.startswith(f"{key} expects ") and "\n" not in problem
    section = "model_args" if rules is MODEL_ARG_RULES else "gen_kwargs"
    with pytest.raises(ConfigError, match=f"eval.{section}"):
        check_eval_options(EvalConfig(tasks=["split"], backend="hf", **{section: {key: value}}))


CONFIG_VALUES = [
    (["--eval.tasks=split,split"], "eval.tasks", "more than once: split"),
    (["--eval.tasks=a, b,a"], "eval.tasks", "more than once: a"),
    (["--eval.batch_size=auto:0"], "eval.batch_size", "auto:0"),
    (["--eval.batch_size=auto:"], "eval.batch_size", "auto:"),
]


@pytest.mark.parametrize("flags,field,says", CONFIG_VALUES)
def test_bad_eval_config_value(flags: list[str], field: str, says: str, demo_assets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    line = one_error(capsys, run_argv(demo_assets, out, *flags))
    assert field in line and says in line, line
    assert not out.exists() or not any(out.iterdir())


# --- registry -------------------------------------------------------------------------------------------

REGISTRY_TEXT = ("model_name", "author", "format_name", "format_version", "description")


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(REGISTRY_TEXT),
    text=st.text(st.characters(codec="utf-8"), min_size=1, max_size=12),
)
def test_registry_text_with_a_control_character_is_one_config_error(name: str, text: str) -> None:
    """Names and labels are one line; a description may have line breaks and tabs, nothing else of Cc."""
    allowed = "\n\t" if name == "description" else ""
    refused = any(c in text for c in map(chr, [*range(32), *range(127, 160)]) if c not in allowed)
    config = Config(registry=RegistryConfig(**{name: text}))
    if refused:
        with pytest.raises(ConfigError, match=f"registry.{name}: (control character|must not be empty)"):
            validate(config)
    elif text.strip() or name == "description":
        validate(config)


def test_carried_over_values_stay_on_one_line() -> None:
    line = describe({"registry.description": "a\nb\tc", "registry.author": "x" * 500, "train.lora_r": 8})
    assert line.isprintable() and "\\n" in line and len(line) < 200, line


def test_ca_cert_that_is_not_a_bundle(tmp_path: Path) -> None:
    (tmp_path / "not.pem").write_text("not a certificate\n")
    (tmp_path / "empty.pem").write_text("")
    for path, says in [
        (tmp_path / "missing.pem", "No such file"),
        (tmp_path, "directory"),
        (tmp_path / "not.pem", "not a PEM certificate bundle"),
        (tmp_path / "empty.pem", "not a PEM certificate bundle"),
    ]:
        with pytest.raises(ConfigError, match=says) as err:
            check_ca_cert(str(path))
        assert err.value.field == "registry.ca_cert" and str(path) in str(err.value)


def test_bad_ca_cert_fails_register_preflight_before_training(demo_assets, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    flags = ["--eval.tasks=split", "--registry.address=local", f"--registry.ca_cert={tmp_path / 'missing.pem'}"]
    line = one_error(capsys, [*run_argv(demo_assets, out), *flags])
    assert "registry.ca_cert" in line, line
    assert not (out / "train").exists()


# --- preview and chat on run directories in odd states ------------------------------------------------------


@pytest.mark.parametrize("state", ["empty", "missing", "only train"])
def test_preview_of_a_run_without_a_dataset_names_the_run(state: str, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    if state != "missing":
        run.mkdir()
    if state == "only train":
        (run / "train").mkdir()
    line = one_error(capsys, ["preview", "-o", str(run)])
    assert "-o" in line and str(run) in line and "tokenizer" not in line, line


@pytest.mark.parametrize("given", ["run", "train", "adapter"])
def test_chat_finds_the_adapter_from_the_run_its_train_output_or_itself(given: str, tmp_path: Path) -> None:
    from lora_pipeline.chat import find_adapter

    adapter = tmp_path / "run" / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter.parent / "metrics.json").write_text('{"quantization": null, "marker": 1}')
    start = {"run": tmp_path / "run", "train": adapter.parent, "adapter": adapter}[given]
    found, metrics = find_adapter(start)
    assert found == adapter.resolve() and metrics.get("marker") == 1


# --- compile: what the eval pod's pre-flight would refuse after training, refused on the desk ---------------

COMPILE_CASES = [
    ([], ["--eval.gen_kwargs", "temperature=hot"], "eval.gen_kwargs"),
    ([], ["--eval.gen_kwargs", "max_tokens=0"], "eval.gen_kwargs"),
    ([], ["--eval.gen_kwargs", "no_such_key=1"], "eval.gen_kwargs"),
    ([], ["--eval.model_args", "max_length=-5"], "eval.model_args"),
    ([], ["--eval.model_args", "pretrained=x"], "eval.model_args"),
    ([], ["--eval.model_args", "peft=x"], "eval.model_args"),
    ([], ["--eval.model_args", "gpu_memory_utilization=0.5", "--eval.backend", "hf"], "eval.model_args"),
    ([], ["--eval.tasks", "split", "--dataset.data_split", "1.0"], "eval.tasks"),
    (["--component", "eval"], ["--eval.model_args", "dtype=notadtype"], "eval.model_args"),
]


@pytest.mark.parametrize("component,flags,field", COMPILE_CASES)
def test_compile_refuses_eval_options_the_eval_pod_would(
    component: list[str], flags: list[str], field: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "pipeline.yaml"
    line = one_error(capsys, ["compile", "--package-spec", "", "-o", str(out), *component, *flags])
    assert field in line, line
    assert not out.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--eval.model_args", "dtype=float16", "--eval.gen_kwargs", "temperature=0,max_tokens=8"],
        ["--eval.model_args", "gpu_memory_utilization=0.5"],  # auto may resolve to vllm in the cluster
        ["--eval.tasks", "split", "--dataset.data_split", "1.0", "--component", "eval"],  # its input decides
    ],
)
def test_compile_keeps_options_a_cluster_may_take(flags: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--package-spec", "", "-o", str(out), *flags]) == 0, capsys.readouterr().err
    assert out.is_file()


# --- a flag naming one thing to do, given twice -----------------------------------------------------------

TWICE = [
    ["export", "-o", "RUN", "--gguf", "f16", "--gguf", "q8_0"],
    ["export", "-o", "RUN", "--merged", "--out", "A", "--out", "B"],
    ["export", "-o", "RUN", "--push-to-hub", "me/a", "--push-to-hub", "me/b"],
    ["export", "-o", "RUN", "-o", "OTHER", "--merged"],
    ["chat", "-o", "RUN", "--prompt", "a", "--prompt", "b"],
    ["chat", "-o", "RUN", "--prompt", "a", "--system", "x", "--system", "y"],
]


@pytest.mark.parametrize("argv", TWICE, ids=[" ".join(a[3:5]) for a in TWICE])
def test_a_one_thing_flag_given_twice_is_refused(argv: list[str], tmp_path: Path, capsys) -> None:
    """argparse keeps the last value: an export type or a prompt would be dropped without a word."""
    argv = [a.replace("RUN", str(tmp_path / "run")).replace("OTHER", str(tmp_path / "other")) for a in argv]
    code = None
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "given twice" in err[0], err


@pytest.mark.parametrize("command", [["export", "--merged", "--out", "EXPORT"], ["chat", "--prompt", "hi"]])
def test_a_base_model_moved_away_is_named(command: list[str], demo_assets, tmp_path: Path, capsys) -> None:
    """The adapter records its base's path; moved away, transformers called it an invalid Hub repo id."""
    adapter = tmp_path / "run" / "train" / "adapter"
    adapter.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_assets.model_dir / name, adapter / name)
    gone = tmp_path / "moved-model"
    (adapter / "adapter_config.json").write_text(f'{{"base_model_name_or_path": "{gone}"}}')
    argv = [command[0], "-o", str(tmp_path / "run"), *[a.replace("EXPORT", str(tmp_path / "x")) for a in command[1:]]]
    line = one_error(capsys, argv)
    assert f"no model at {gone}" in line and "Repo id" not in line, line


def test_chat_on_an_adapter_without_tokenizer_files_is_one_line(tmp_path: Path, capsys) -> None:
    adapter = tmp_path / "run" / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"base_model_name_or_path": "/nowhere"}')
    line = one_error(capsys, ["chat", "-o", str(tmp_path / "run"), "--prompt", "hi"])
    assert "tokenizer" in line and str(adapter) in line, line


def _group_dir(tmp_path: Path, demo_assets, members: list[str]) -> Path:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = demo_assets.task_dir / f"{demo_assets.task_name}_test.jsonl"
    body = f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n" + TASK_BODY
    (tasks / "member.yaml").write_text("task: member_t\n" + body)
    (tasks / "group.yaml").write_text("group: my_group\ntask:\n" + "".join(f"  - {m}\n" for m in members))
    return tasks


def test_a_local_group_of_local_tasks_passes(demo_assets, tmp_path: Path) -> None:
    check_eval_options(
        EvalConfig(tasks=["my_group"], include_path=str(_group_dir(tmp_path, demo_assets, ["member_t"])))
    )


@pytest.mark.integration  # an unknown member makes the check index lm-eval's thousands of built-in tasks (~8 s)
def test_a_group_listing_an_unknown_task_names_it(demo_assets, tmp_path: Path) -> None:
    tasks = _group_dir(tmp_path, demo_assets, ["member_t", "no_such_member"])
    with pytest.raises(ConfigError, match="group 'my_group' .*group.yaml.* lists task 'no_such_member'") as err:
        check_eval_options(EvalConfig(tasks=["my_group"], include_path=str(tasks)))
    assert err.value.field == "eval.tasks"


UNINDEXED = [
    ("include: missing_base.yaml\ntask: lost_t\n", "include: missing_base.yaml is not beside it"),
    ("task: lost_t\ndoc_to_text: [unclosed\n", "not valid YAML"),
    ("task: 'lost_t'\nprocess_docs: !function utils.process\n", "eval.verbosity DEBUG"),
]


@pytest.mark.parametrize("text,says", UNINDEXED)
def test_a_task_yaml_lm_eval_skipped_is_named(text: str, says: str, tmp_path: Path) -> None:
    from lora_pipeline.evaluation.checks import _unindexed_yaml

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "lost.yaml").write_text(text)
    (tmp_path / "other.yaml").write_text("task: other_t\n")
    name, path, why = _unindexed_yaml(tmp_path, ["nope", "lost_t"])
    assert (name, path) == ("lost_t", tmp_path / "sub" / "lost.yaml") and says in why
    assert _unindexed_yaml(tmp_path, ["nope"]) is None


@pytest.mark.integration  # the unknown name makes the check index lm-eval's built-in tasks (~8 s)
def test_an_unloadable_task_yaml_is_named_in_preflight(tmp_path: Path) -> None:
    (tmp_path / "lost.yaml").write_text(UNINDEXED[0][0])
    with pytest.raises(ConfigError, match=r"task 'lost_t': lm-eval could not load .*lost\.yaml") as err:
        check_eval_options(EvalConfig(tasks=["lost_t"], include_path=str(tmp_path)))
    assert err.value.field == "eval.include_path"
