"""Leaks found by planting secrets everywhere and grepping what a run writes (issue 17 §1, second pass):
log lines that reach no root handler, exceptions logged with their traceback, the process's command line
as libraries record it, and a torchrun worker's own error lines. In-process."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import string
import sys
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_pipeline.cli import main
from lora_pipeline.config import RegistryConfig, TrainConfig
from lora_pipeline.errors import ConfigError
from lora_pipeline.logs import install_log_filter
from lora_pipeline.redaction import remember
from lora_pipeline.stages.register import register_adapter
from test_register import make_run

# Secret-shaped text with no character the log format or a URI splits on; the random head keeps one example's
# secret from being scrubbed because an earlier example remembered a part of it.
_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=",\\'\"`%\x00")
_SECRET = st.builds(lambda tail: f"Qz{uuid.uuid4().hex[:8]}{tail}", st.text(_CHARS, min_size=4, max_size=20))


@pytest.fixture
def scrubbing_logs():
    """The CLI's log scrubbing, undone after the test (the record factory is process-wide)."""
    factory = logging.getLogRecordFactory()
    install_log_filter()
    yield
    logging.setLogRecordFactory(factory)


def _own_handler_logger(name: str) -> tuple[logging.Logger, io.StringIO]:
    """A library logger as transformers sets one up: its own handler, not propagating to the root."""
    logger = logging.getLogger(name)
    out = io.StringIO()
    logger.handlers = [logging.StreamHandler(out)]
    logger.propagate, logger.level = False, logging.DEBUG
    return logger, out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=_SECRET, how=st.sampled_from(["message", "args", "exception", "uri", "stack"]))
def test_no_log_record_shows_a_secret_whatever_handler_prints_it(scrubbing_logs, secret, how) -> None:
    remember(secret)
    logger, out = _own_handler_logger(f"lib{uuid.uuid4().hex[:6]}")
    if how == "message":
        logger.warning(f"token {secret} refused")
    elif how == "args":
        logger.debug("Response body: %s", {"auth": f"AWS4-HMAC-SHA256 Credential={secret}/x"})
    elif how == "uri":
        logger.info("GET %s", f"https://user:{secret}@host.example/x?sig={secret}")
    elif how == "stack":
        logger.warning(f"at {secret}", stack_info=True)
    else:
        try:
            raise ValueError(f"invalid XML received: {secret}")
        except ValueError:
            logger.debug("Exception caught when parsing error response body:", exc_info=True)
    text = out.getvalue()
    assert text and secret not in text, text


def test_a_bad_library_format_string_shows_its_parts_scrubbed(scrubbing_logs, capsys) -> None:
    secret = f"Qz{uuid.uuid4().hex}"
    remember(secret)
    logger, out = _own_handler_logger("lib-bad-format")
    logger.warning("bad %d", secret)  # logging would print its own error, with the arguments, on stderr
    assert secret not in out.getvalue() + capsys.readouterr().err
    assert "bad %d" in out.getvalue()


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=_SECRET)
def test_the_process_command_line_is_scrubbed_once_the_config_is_read(tmp_path_factory, monkeypatch, secret) -> None:
    """wandb records sys.argv as its run's `args`: the command line holds no secret once the config is read."""
    argv = [
        *("run", "-o", str(tmp_path_factory.mktemp("r") / "r"), "--print_config"),
        *("--registry.token", secret, "--train.env_vars", f"SOME_SETTING={secret}"),
        *("--eval.model_args", f"token={secret}", "--dataset.data_uri", f"https://u:{secret}@h.example/x.jsonl"),
    ]
    monkeypatch.setattr(sys, "argv", ["lora-pipeline", *argv])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "lora_pipeline.cli", *argv])
    assert main(argv) == 0
    assert not [a for a in sys.argv + sys.orig_argv if secret in a], sys.argv
    assert sys.argv[1:5] == argv[:4]  # the rest of the command line is kept


def test_a_training_worker_scrubs_its_own_error_line(tmp_path, capsys, monkeypatch) -> None:
    """A torchrun worker reads the config from its environment: it learns the config's secrets there, as the CLI
    does, and takes the config out of the environment its own subprocesses inherit."""
    from lora_pipeline.training.launch import CONFIG_ENV, worker_main

    secret = f"Qz{uuid.uuid4().hex}"
    config = json.dumps(dataclasses.asdict(TrainConfig(env_vars=f"SOME_SETTING={secret}")))
    monkeypatch.setenv(CONFIG_ENV, config)

    def fails(cfg: TrainConfig, *_: object) -> None:
        raise ConfigError(f"cannot apply {cfg.env_vars}", field="train.env_vars")

    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())  # restored afterwards
    assert worker_main(fails, [str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "SOME_SETTING" in err and secret not in err
    assert CONFIG_ENV not in os.environ


def test_training_processes_get_the_config_without_a_file_or_their_command_line(tmp_path, monkeypatch) -> None:
    """A file would outlive a run killed by SIGKILL or the OOM killer, in the run directory."""
    from lora_pipeline.training import launch

    secret = f"Qz{uuid.uuid4().hex}"
    cfg = TrainConfig(env_vars=f"DB_PASS={secret}", num_procs="2")
    started: list = []

    class Started:
        def __init__(self, command: list[str], env: dict[str, str], **_: object) -> None:
            started.append((command, env))
            assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(launch.subprocess, "Popen", Started)
    out = tmp_path / "run" / "train"
    out.parent.mkdir()
    assert launch.maybe_launch(cfg, tmp_path / "run" / "dataset", out, "lora_pipeline.stages.train") == out
    (command, env) = started[0]
    assert not [a for a in command if secret in a]
    assert TrainConfig(**json.loads(env[launch.CONFIG_ENV])) == cfg


# (compile mode, flag, a value holding a password): every flag written into the YAML is checked, with or
# without a scheme
FLAG_CREDENTIALS = [
    ("trainjob", "--pip-trusted-host", "tuser:PW-4242@mirror.example"),
    ("trainjob", "--image", "iuser:PW-4242@registry.example/img:1"),
    ("trainjob", "--image", "https://iuser:PW-4242@registry.example/img:1"),
    ("trainjob", "--pvc", "puser:PW-4242@claim"),
    ("component", "--pip-index-url", "https://u:PW-4242@mirror.example/simple"),
]


@pytest.mark.parametrize(("mode", "flag", "value"), FLAG_CREDENTIALS)
def test_compile_refuses_credentials_in_any_flag_it_writes(capsys, tmp_path, mode, flag, value) -> None:
    out = tmp_path / "o.yaml"
    head = ["compile", "--trainjob", "--dry-run"] if mode == "trainjob" else ["compile", "--component", "train"]
    code = main([*head, "-o", str(out), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "user:password@" in err, err
    assert "4242" not in err and not out.exists()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--image", "registry.example:5000/team/img@sha256:" + "a" * 64), ("--pip-trusted-host", "mirror.example:8080")],
)
def test_compile_keeps_flags_that_only_look_like_credentials(capsys, tmp_path, flag, value) -> None:
    out = tmp_path / "t.yaml"
    assert main(["compile", "--trainjob", "--dry-run", "-o", str(out), flag, value]) == 0, capsys.readouterr().err


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=_SECRET, user=st.text(string.ascii_letters, min_size=1, max_size=6))
def test_registry_free_text_keeps_no_uri_credentials(tmp_path_factory, capsys, private_registry, secret, user) -> None:
    """The description and author are sent to the registry as given: a URI quoted in them loses its credentials
    in the registry, registration.json and `models show`."""
    tmp, name = tmp_path_factory.mktemp("reg"), f"m{uuid.uuid4().hex[:8]}"
    run_dir = make_run(tmp / "run")
    quoted = f"data from https://{user}:{secret}@example.org/x.jsonl?sig={secret} (private)"
    cfg = RegistryConfig(address="local", model_name=name, version="1.0.0", description=quoted,
                         author=f"s3://bucket/k?X-Amz-Signature={secret}")  # fmt: skip
    register_adapter(cfg, run_dir / "train", run_dir / "eval", run_dir / "register")
    assert main(["models", "show", name]) == 0
    shown = capsys.readouterr().out
    assert "data from https://<redacted>@" in shown and "(private)" in shown  # the text around the URI is kept
    written = b"".join(p.read_bytes() for p in [*tmp.rglob("*"), *private_registry.parent.rglob("*")] if p.is_file())
    assert secret.encode() not in written and secret not in shown


# (option, free text quoting a URI with credentials): compile searches free text for the URIs it quotes
QUOTED = [
    ("--registry.description", "data from https://u:PW-4242@h.example/x.jsonl, cleaned"),
    ("--registry.description", "see https://h.example/x?X-Amz-Signature=SIG-4242 for the source"),
    ("--train.annotations", "source=https://u:PW-4242@h.example/x,team=nlp"),
    ("--registry.author", "ana (s3://AK:PW-4242@bucket/k)"),
]


@pytest.mark.parametrize(("option", "text"), QUOTED)
def test_compile_refuses_credentials_quoted_in_free_text(capsys, tmp_path, option, text) -> None:
    out = tmp_path / "t.yaml"
    code = main(["compile", "--trainjob", "--dry-run", "-o", str(out), option, text])
    err = capsys.readouterr().err
    assert code == 2 and option.lstrip("-") in err and "4242" not in err and not out.exists(), err


def test_compile_keeps_free_text_quoting_plain_uris(tmp_path) -> None:
    out = tmp_path / "t.yaml"
    note = "see hf://org/data?split=train and https://h.example/docs?page=2#usage"
    assert main(["compile", "--trainjob", "--dry-run", "-o", str(out), "--train.annotations", f"note={note}"]) == 0
    assert note in out.read_text()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=_SECRET, key=st.sampled_from(["token", "use_auth_token", "password", "key", "secret", "api_key"]))
def test_eval_results_keep_no_credential_a_task_yaml_quotes(tmp_path_factory, secret, key) -> None:
    """lm-eval records each task's config (the task YAML of eval.include_path) in its results."""
    from lora_pipeline.config import EvalConfig
    from lora_pipeline.stages.evaluate import _write_results

    task = {
        "task": "t",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"https://u:{secret}@h.example/t.jsonl"}, key: secret},
        "metadata": {"source": f"s3://bucket/t.jsonl?X-Amz-Signature={secret}"},
        "doc_to_choice": ["a", "b"],
    }
    tuned = {"results": {"t": {"acc,none": 0.5}}, "configs": {"t": task}, "tokenizer_pad_token": ["<|pad|>", 0]}
    out = tmp_path_factory.mktemp("eval") / "eval"
    _write_results(EvalConfig(tasks=["t"], log_samples=False), out, {"tuned": tuned, "comparison": []}, {})
    written = (out / "eval_results.json").read_text()
    assert secret not in written
    recorded = json.loads(written)["tuned"]
    assert recorded["configs"]["t"]["dataset_kwargs"][key] == "<redacted>"
    assert recorded["configs"]["t"]["doc_to_choice"] == ["a", "b"] and recorded["tokenizer_pad_token"] == ["<|pad|>", 0]
