"""Bad input, tried as a user would: each case is exit 2, one line naming the field or file:row, no
traceback, and nothing left on disk (hidden work directories included).

Cases run in-process through `cli.main` (test_cli.py runs the console script itself). Each is placed where it
fails fastest: config values on `run` (validation precedes everything), data on `dataset`, model paths on
`train`, eval options on `eval`, registry options on `register`, so the table stays quick.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest

from conftest import CHAT_ROWS, cli_exit_code, write_jsonl
from helpers import base_url, loopback_server

# (id, command, args, text the single error line must contain). Placeholders in args:
#   {data} good chat file   {tmp} a fresh dir   {model} the demo model   {file} a plain file
#   {http} a loopback HTTP server's base URL   {tasks} the demo task dir   {port} a listening port
CASES: list[tuple[str, str, list[str], str]] = [
    # --- config values (flags) ---
    ("unknown-flag", "run", ["--train.lora_rr", "3"], "--train.lora_rr"),
    ("int-not-number", "run", ["--train.lora_r", "abc"], "train.lora_r"),
    ("int-zero", "run", ["--train.lora_r", "0"], "train.lora_r"),
    ("int-fraction", "run", ["--train.lora_r", "1.5"], "train.lora_r"),
    ("split-above-1", "run", ["--dataset.data_split", "1.5"], "dataset.data_split"),
    ("split-zero", "run", ["--dataset.data_split", "0"], "dataset.data_split"),
    ("split-nan", "run", ["--dataset.data_split", "nan"], "dataset.data_split"),
    ("lr-nan", "run", ["--train.learning_rate", "nan"], "train.learning_rate"),
    ("lr-inf", "run", ["--train.learning_rate", "inf"], "train.learning_rate"),
    ("lr-negative", "run", ["--train.learning_rate", "-1e-4"], "train.learning_rate"),
    ("lr-zero", "run", ["--train.learning_rate", "0"], "train.learning_rate"),
    ("dropout-nan", "run", ["--train.lora_dropout", "nan"], "train.lora_dropout"),
    ("dropout-one", "run", ["--train.lora_dropout", "1.0"], "train.lora_dropout"),
    ("dropout-negative", "run", ["--train.lora_dropout", "-0.1"], "train.lora_dropout"),
    ("bool-word", "run", ["--train.lora_load_in_4bit", "maybe"], "train.lora_load_in_4bit"),
    ("4bit-and-8bit", "run", ["--train.lora_load_in_8bit", "true"], "train.lora_load_in_8bit"),
    ("scheduler", "run", ["--train.lr_scheduler", "cosinee"], "train.lr_scheduler"),
    ("epochs-zero", "run", ["--train.epochs", "0"], "train.epochs"),
    ("seq-len-tiny", "run", ["--train.max_seq_len", "4"], "train.max_seq_len"),
    ("batch-negative", "run", ["--train.effective_batch_size", "-8"], "train.effective_batch_size"),
    ("num-procs", "run", ["--train.num_procs", "many"], "train.num_procs"),
    ("cpu-quantity", "run", ["--train.cpu", "4cores"], "train.cpu"),
    ("memory-quantity", "run", ["--train.memory", "32GB"], "train.memory"),
    ("labels-no-value", "run", ["--train.labels", "team"], "train.labels"),
    ("env-vars-no-key", "run", ["--train.env_vars", "=x"], "train.env_vars"),
    ("fsdp-strategy", "run", ["--train.fsdp_sharding_strategy", "SHARD_ALL"], "train.fsdp_sharding_strategy"),
    ("quant-type", "run", ["--train.bnb_4bit_quant_type", "int4"], "train.bnb_4bit_quant_type"),
    ("compute-dtype", "run", ["--train.bnb_4bit_compute_dtype", "fp8"], "train.bnb_4bit_compute_dtype"),
    ("checkpoint-minutes", "run", ["--train.checkpoint_minutes", "-1"], "train.checkpoint_minutes"),
    ("checkpoint-steps", "run", ["--train.checkpoint_steps", "x"], "train.checkpoint_steps"),
    ("subset-negative", "run", ["--dataset.subset", "-5"], "dataset.subset"),
    ("tasks-empty", "run", ["--eval.tasks", ""], "eval.tasks"),
    ("tasks-bad-json", "run", ["--eval.tasks", "[arc"], "eval.tasks"),
    ("limit-zero", "run", ["--eval.limit", "0"], "eval.limit"),
    ("eval-batch", "run", ["--eval.batch_size", "big"], "eval.batch_size"),
    ("gen-kwargs", "run", ["--eval.gen_kwargs", "temperature"], "eval.gen_kwargs"),
    ("model-args-list", "run", ["--eval.model_args", "[1,2]"], "eval.model_args"),
    ("verbosity", "run", ["--eval.verbosity", "LOUD"], "eval.verbosity"),
    ("semver", "run", ["--registry.version", "v1"], "registry.version"),
    ("port-range", "run", ["--registry.port", "70000"], "registry.port"),
    ("model-name-blank", "run", ["--registry.model_name", " "], "registry.model_name"),
    ("no-data-uri", "run", ["-o", "{tmp}/run"], "dataset.data_uri"),
    # --- YAML ---
    ("yaml-unknown-key", "run", ["-c", "yaml:train: {lora_rank: 4}"], "train.lora_rank"),
    ("yaml-syntax", "run", ["-c", "yaml:train: [unclosed"], "--config"),
    ("yaml-missing", "run", ["-c", "{tmp}/missing.yaml"], "--config"),
    ("yaml-not-mapping", "run", ["-c", "yaml:- a\n- b"], "--config"),
    ("yaml-unknown-section", "run", ["-c", "yaml:training: {lora_r: 4}"], "training"),
    ("yaml-section-scalar", "run", ["-c", "yaml:train: 5"], "train"),
    ("yaml-wrong-type", "run", ["-c", "yaml:train: {lora_r: abc}"], "train.lora_r"),
    ("yaml-nan", "run", ["-c", "yaml:train: {learning_rate: .nan}"], "train.learning_rate"),
    ("yaml-list-for-int", "run", ["-c", "yaml:train: {epochs: [1, 2]}"], "train.epochs"),
    # --- data ---
    ("data-missing-file", "dataset", ["--dataset.data_uri", "{tmp}/none.jsonl"], "dataset.data_uri"),
    ("data-empty-file", "dataset", ["--dataset.data_uri", "file:empty.jsonl"], "dataset"),
    ("data-all-rows-bad", "dataset", ["--dataset.data_uri", "file:bad_rows.jsonl"], "bad_rows.jsonl:1"),
    ("data-json-invalid", "dataset", ["--dataset.data_uri", "file:broken.json"], "broken.json"),
    ("data-json-scalar", "dataset", ["--dataset.data_uri", "file:scalar.json"], "scalar.json"),
    ("data-json-latin1", "dataset", ["--dataset.data_uri", "file:latin1.json"], "latin1.json"),
    ("data-extension", "dataset", ["--dataset.data_uri", "file:rows.txt"], "dataset.data_uri"),
    ("data-empty-dir", "dataset", ["--dataset.data_uri", "{tmp}"], "dataset.data_uri"),
    # --- URIs ---
    ("uri-refused", "dataset", ["--dataset.data_uri", "http://127.0.0.1:{closed}/x.jsonl"], "dataset.data_uri"),
    ("uri-404", "dataset", ["--dataset.data_uri", "{http}/missing.jsonl"], "dataset.data_uri"),
    ("uri-s3", "dataset", ["--dataset.data_uri", "s3://bucket/x.jsonl"], "dataset.data_uri"),
    ("uri-hf", "dataset", ["--dataset.data_uri", "hf://owner/name"], "dataset.data_uri"),
    ("uri-ftp", "dataset", ["--dataset.data_uri", "ftp://host/x.jsonl"], "dataset.data_uri"),
    # --- model paths ---
    ("model-missing", "train", ["--train.model", "{tmp}/no-model"], "train.model"),
    ("model-is-file", "train", ["--train.model", "{file}"], "train.model"),
    ("model-config-only", "train", ["--train.model", "file:config_only"], "train.model"),
    ("model-config-invalid", "train", ["--train.model", "file:bad_config"], "train.model"),
    ("model-no-weights", "train", ["--train.model", "file:no_weights"], "train.model"),
    ("model-truncated", "train", ["--train.model", "file:truncated"], "train.model"),
    ("model-hub-not-cached", "train", ["--train.model", "Qwen/Qwen2.5-1.5B-Instruct"], "train.model"),
    ("model-hub-bad-id", "train", ["--train.model", "not a//model"], "train.model"),
    # --- output directories ---
    ("out-is-file", "run", ["--dataset.data_uri", "{data}", "-o", "{file}"], "-o"),
    ("out-under-file", "run", ["--dataset.data_uri", "{data}", "-o", "{file}/run"], "-o"),
    ("out-read-only", "run", ["--dataset.data_uri", "{data}", "-o", "/proc/lora-run"], "-o"),
    ("out-not-a-run", "train", ["-o", "file:not_a_run"], "-o"),
    ("stage-out-is-file", "dataset", ["--dataset.data_uri", "{data}", "--out", "{file}"], "--out"),
    ("stage-input-missing", "train", ["--out", "{tmp}/t"], "--input"),
    ("stage-input-unknown", "train", ["--input", "eval={tmp}", "--out", "{tmp}/t"], "--input"),
    ("stage-input-no-dir", "train", ["--input", "dataset={tmp}/none", "--out", "{tmp}/t"], "--input"),
    # --- eval and registry options ---
    ("eval-unknown-task", "eval", ["--eval.tasks", "no_such_task", "--eval.include_path", "{tasks}"], "eval.tasks"),
    ("eval-include-missing", "eval", ["--eval.include_path", "{tmp}/no-tasks"], "eval.include_path"),
    (
        "eval-model-args-key",
        "eval",
        ["--eval.model_args", "bogus_key=1", "--eval.tasks", "demo_topic", "--eval.include_path", "{tasks}"],
        "eval.model_args",
    ),
    (
        "eval-relative-data-files",
        "eval",
        ["--eval.tasks", "rel_task", "--eval.include_path", "file:rel_tasks"],
        "rel_task",
    ),
    ("eval-backend-choice", "run", ["--eval.backend", "tpu"], "eval.backend"),
    (
        "eval-vllm-key-on-hf",
        "eval",
        ["--eval.backend", "hf", "--eval.model_args", "gpu_memory_utilization=0.5", "--eval.tasks", "split"],
        "eval.model_args: 'gpu_memory_utilization' is an option of the vllm backend only",
    ),
    (
        "eval-vllm-gen-key-on-hf",
        "eval",
        ["--eval.backend", "hf", "--eval.gen_kwargs", "presence_penalty=1", "--eval.tasks", "split"],
        "eval.gen_kwargs: 'presence_penalty'",
    ),
    ("eval-max-tokens", "eval", ["--eval.gen_kwargs", "max_tokens=many", "--eval.tasks", "split"], "max_tokens"),
    (
        "registry-refused",
        "register",
        ["--registry.address", "127.0.0.1", "--registry.port", "{closed}"],
        "registry.address",
    ),
    ("registry-bad-host", "register", ["--registry.address", "http://"], "registry.address"),
    # --- data formats and download limits ---
    ("data-format-choice", "run", ["--dataset.format", "csvv"], "dataset.format"),
    ("data-columns-field", "run", ["--dataset.columns", "answer=output"], "dataset.columns"),
    ("data-sha256-not-hex", "run", ["--dataset.sha256", "xyz"], "dataset.sha256"),
    ("data-max-bad-rows", "run", ["--dataset.max_bad_rows", "1.5"], "dataset.max_bad_rows"),
    ("data-format-mismatch", "dataset", ["--dataset.data_uri", "{data}", "--dataset.format", "alpaca"], "instruction"),
    ("data-checksum", "dataset", ["--dataset.data_uri", "{http}/good.jsonl#sha256=" + "0" * 64], "checksum mismatch"),
    (
        "data-max-bytes",
        "dataset",
        ["--dataset.data_uri", "{http}/good.jsonl", "--dataset.max_bytes", "10"],
        "max_bytes",
    ),
    ("uri-s3-userinfo", "dataset", ["--dataset.data_uri", "s3://key:secretpw@bucket/x.jsonl"], "AWS_* variables"),
    ("uri-hf-bad-option", "dataset", ["--dataset.data_uri", "hf://owner/name?splt=train"], "unknown option"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, demo_assets) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    write_jsonl(root / "good.jsonl", CHAT_ROWS)
    (root / "empty.jsonl").write_text("")
    write_jsonl(root / "bad_rows.jsonl", ['{"text": 1}', "{nope", {"messages": []}])
    (root / "broken.json").write_text('[{"messages": ')
    (root / "scalar.json").write_text("42")
    (root / "latin1.json").write_bytes(json.dumps(CHAT_ROWS[:2]).encode().replace(b"What", b"Wh\xe9t"))
    (root / "rows.txt").write_text("hello\n")
    (root / "plain_file").write_text("x")
    model = Path(demo_assets.model_dir)
    (root / "config_only").mkdir()
    shutil.copy(model / "config.json", root / "config_only")
    (root / "bad_config").mkdir()
    (root / "bad_config" / "config.json").write_text("{model_type: qwen2")
    shutil.copytree(model, root / "no_weights")
    for weights in (root / "no_weights").glob("*.safetensors"):
        weights.unlink()
    shutil.copytree(model, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (root / "not_a_run").mkdir()
    (root / "not_a_run" / "run.json").write_text("not json")
    (root / "rel_tasks").mkdir()
    (root / "rel_tasks" / "rel_task.yaml").write_text(
        "task: rel_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: relative/test.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\n"
        "doc_to_choice: ['a', 'b']\nmetric_list:\n  - metric: acc\n"
    )
    return {"root": root, "model": model, "tasks": Path(demo_assets.task_dir)}


@pytest.fixture(scope="module")
def http_base(files) -> Iterator[str]:
    handler = type("H", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    with loopback_server(lambda *a: handler(*a, directory=str(files["root"]))) as server:
        yield base_url(server)


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) lora_pipeline[.\w]*: ")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _params() -> list:
    """The cases; those that start the HTTP server, and the unknown task name (lm-eval indexes its thousands of
    built-in tasks first, ~8 s: the eval stage's own work), run with the integration tests."""
    params = []
    for name, command, args, expected in CASES:
        integration = name == "eval-unknown-task" or any("{http}" in arg for arg in args)
        marks = [pytest.mark.integration] if integration else []
        params.append(pytest.param(command, args, expected, id=name, marks=marks))
    return params


@pytest.mark.parametrize(("command", "args", "expected"), _params())
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(
    command: str, args: list[str], expected: str, files, tmp_path: Path, request, monkeypatch, capsys
) -> None:
    root = files["root"]
    values = {
        "data": str(root / "good.jsonl"),
        "tmp": str(tmp_path),
        "model": str(files["model"]),
        "file": str(root / "plain_file"),
        "http": request.getfixturevalue("http_base") if any("{http}" in arg for arg in args) else "",
        "tasks": str(files["tasks"]),
        "closed": str(_closed_port()),
    }
    argv = []
    for arg in args:
        if arg.startswith("yaml:"):
            (tmp_path / "c.yaml").write_text(arg[5:] + "\n")
            arg = str(tmp_path / "c.yaml")
        elif arg.startswith("file:"):
            arg = str(root / arg[5:])
        argv.append(arg.format(**values))
    if "-o" not in argv and "--out" not in argv:
        argv += ["-o", str(tmp_path / "run")]
    if command in ("train", "eval", "register", "dataset") and "--train.model" not in argv:
        argv += ["--train.model", str(files["model"])]  # a valid model, so the case fails where it means to
    before_inputs, before_tmp = _snapshot(root), _snapshot(tmp_path)

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when the hub is imported
    monkeypatch.setattr("lora_pipeline.sources.http.time.sleep", lambda s: None)  # retries without the backoff

    code = cli_exit_code([command, *argv])
    stderr = capsys.readouterr().err

    lines = stderr.strip().splitlines()
    assert code == 2, stderr[-2000:]
    errors = [line for line in lines if not LOG_LINE.match(line)]  # progress/retry log lines may come first
    assert len(errors) == 1 and errors == lines[-1:], stderr[-2000:]
    assert errors[0].startswith("lora-pipeline: error: ") and expected in errors[0], errors[0]
    assert "Traceback" not in stderr
    assert _snapshot(root) == before_inputs  # nothing written beside the inputs
    assert _snapshot(tmp_path) == before_tmp  # no run dir, no hidden work or lock files


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
