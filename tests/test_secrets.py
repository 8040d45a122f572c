"""Secrets by construction (issue 17 §1): nothing a command writes or prints holds secret material.

In-process through `lora_pipeline.cli.main`; the property test generates URIs, env values and model args
with arbitrary characters and checks stdout, stderr, logs, run.json, the report and compiled YAML."""

from __future__ import annotations

import json
import string
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import CHAT_ROWS, write_jsonl
from lora_pipeline.cli import main
from lora_pipeline.config import Config, from_dict, restore_secrets
from lora_pipeline.errors import ConfigError
from lora_pipeline.redaction import MARK, Secret, json_default, redact_config, redact_uri, scrub


def _run(capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err + caplog.text


def _written(root: Path) -> str:
    return "".join(p.read_bytes().decode(errors="replace") for p in root.rglob("*") if p.is_file())


# --- table-driven: each "Found" item of §1 -------------------------------------------------------------

# (compile mode, flags, the secret, the option named in the refusal, the Kubernetes-secret option it names)
COMPILE_REFUSED = [
    ("pipeline", ["--registry.token", "regTOKEN-4242"], "regTOKEN-4242", "registry.token", "--registry-token-secret"),
    ("pipeline", ["--train.env_vars", "DB_PASS=dbPASS-4242"], "dbPASS-4242", "train.env_vars", "Kubernetes secret"),
    ("component", ["--train.env_vars", "DB_PASS=dbPASS-4242"], "dbPASS-4242", "train.env_vars", "Kubernetes secret"),
    ("trainjob", ["--train.env_vars", "DB_PASS=dbPASS-4242"], "dbPASS-4242", "train.env_vars", "Kubernetes secret"),
    ("pipeline", ["--train.env_vars", "GITHUB_PAT=ghpPAT-4242"], "ghpPAT-4242", "train.env_vars", "Kubernetes secret"),
    ("pipeline", ["--train.env_vars", "HF_TOKEN=hfTOK-4242"], "hfTOK-4242", "train.env_vars", "--hf-token-secret"),
    ("pipeline", ["--eval.model_args", "token=mTOKEN-4242"], "mTOKEN-4242", "eval.model_args", "--hf-token-secret"),
    ("pipeline", ["--dataset.data_uri", "https://u:pw-4242@h/x.jsonl"], "pw-4242", "dataset.data_uri", "--aws-secret"),
    ("pipeline", ["--dataset.data_uri", "https://h/x.jsonl?sig=SIG-4242"], "SIG-4242", "dataset.data_uri", "secret"),
    ("pipeline", ["--dataset.data_uri", "s3://AK:se/cret-4242@b/k"], "cret-4242", "dataset.data_uri", "--aws-secret"),
    ("component", ["--dataset.data_uri", "s3://b/k?X-Amz-Security-Token=T-4242"], "T-4242", "dataset.data_uri", "aws"),
    ("pipeline", ["--package-spec", "git+https://tok-4242@git.example/p.git"], "tok-4242", "--package-spec", "pip"),
]


def _compile_argv(mode: str, out: Path) -> list[str]:
    if mode == "component":
        return ["compile", "--component", "train", "-o", str(out)]
    if mode == "trainjob":
        return ["compile", "--trainjob", "--dry-run", "-o", str(out)]
    return ["compile", "-o", str(out)]


@pytest.mark.parametrize(("mode", "flags", "secret", "field", "option"), COMPILE_REFUSED)
def test_compile_refuses_a_secret_given_as_a_value(capsys, caplog, tmp_path, mode, flags, secret, field, option):
    out = tmp_path / "out.yaml"
    code, text = _run(capsys, caplog, *_compile_argv(mode, out), *flags)
    assert code == 2
    line = capsys.readouterr().err or text.strip().splitlines()[-1]
    assert text.count("lora-pipeline: error:") == 1 and field in text and option.lower() in text.lower(), text
    assert secret not in text and not out.exists(), line


def test_compile_keeps_plain_settings(capsys, caplog, tmp_path) -> None:
    out = tmp_path / "job.yaml"
    code, text = _run(capsys, caplog, *_compile_argv("trainjob", out), "--train.env_vars", "MY_FLAG=1,NCCL_DEBUG=INFO")
    assert code == 0, text
    assert "MY_FLAG" in out.read_text() and "NCCL_DEBUG" in out.read_text()


PRINTED = [  # (flags, secrets that --print_config must not show)
    (["--train.env_vars", "DB_PASS=dbPASS-4242,MY_PRIVATE_KEY=pk-4242x,GITHUB_PAT=pat-4242"], ["4242"]),
    (["--train.env_vars", "WHATEVER=unknown-4242"], ["unknown-4242"]),  # an unknown name is not harmless
    (["--eval.model_args", "token=mTOKEN-4242,custom=cust-4242"], ["4242"]),
    (["--dataset.data_uri", "s3://AKIA4242:se/cret4242@bucket/k"], ["4242", "se/cret", "cret"]),
    (["--dataset.data_uri", "https://user:p@ss/w4242@host/x"], ["p@ss", "ss/w", "4242"]),
    (["--dataset.data_uri", "https://user:p/ss4242@host/x"], ["p/ss", "4242"]),
    (["--dataset.data_uri", "s3://bucket/k?X-Amz-Security-Token=T4242&x=1"], ["T4242", "X-Amz-Security-Token"]),
    (["--registry.token", "regTOKEN-4242"], ["regTOKEN-4242"]),
]


@pytest.mark.parametrize(("flags", "secrets"), PRINTED)
def test_print_config_shows_no_secret(capsys, caplog, tmp_path, flags, secrets) -> None:
    code, text = _run(capsys, caplog, "run", "-o", str(tmp_path / "r"), "--print_config", *flags)
    assert code == 0 and MARK in text
    assert not [s for s in secrets if s in text], text


@pytest.mark.parametrize(
    "uri",
    ["s3://AKIA:se/cret4242@bucket/key", "ftp://user:p@ss/w4242@host/x", "ftp://user:p/ss4242@host/x"],
)
def test_error_lines_show_no_uri_secret(capsys, caplog, tmp_path, uri) -> None:
    code, text = _run(capsys, caplog, "dataset", "-o", str(tmp_path / "r"), "--dataset.data_uri", uri)
    assert code == 2 and "dataset.data_uri" in text
    assert "4242" not in text and "cret" not in text, text


def test_records_keep_only_harmless_values(capsys, caplog, tmp_path) -> None:
    run_dir = tmp_path / "r"
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    env = "DB_PASS=dbPASS-4242,MY_PRIVATE_KEY=pk-4242x,GITHUB_PAT=pat-4242,OMP_NUM_THREADS=2"
    flags = [
        "--dataset.data_uri",
        str(data),
        "--train.env_vars",
        env,
        "--eval.model_args",
        "token=m-4242,dtype=float32",
    ]
    code, text = _run(capsys, caplog, "dataset", "-o", str(run_dir), *flags)
    assert code == 0, text
    record = json.loads((run_dir / "run.json").read_text())
    assert (
        record["config"]["train"]["env_vars"]
        == f"DB_PASS={MARK},MY_PRIVATE_KEY={MARK},GITHUB_PAT={MARK},OMP_NUM_THREADS=2"
    )
    assert record["config"]["eval"]["model_args"] == {"token": MARK, "dtype": "float32"}
    assert "4242" not in _written(run_dir) + text  # run.json (overrides included), report.html, logs


def test_a_continued_run_takes_secrets_from_the_environment_or_asks_again(monkeypatch) -> None:
    recorded = {"train": {"env_vars": f"WANDB_API_KEY={MARK},NCCL_DEBUG=INFO"}, "eval": {"model_args": {"token": MARK}}}
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError) as err:
        restore_secrets(from_dict(recorded), ("train",))
    assert err.value.field == "train.env_vars" and "WANDB_API_KEY" in str(err.value)
    monkeypatch.setenv("WANDB_API_KEY", "wandb-from-env")
    assert (
        restore_secrets(from_dict(recorded), ("train",)).train.env_vars
        == "WANDB_API_KEY=wandb-from-env,NCCL_DEBUG=INFO"
    )
    with pytest.raises(ConfigError) as err:
        restore_secrets(from_dict(recorded), ("eval",))
    assert err.value.field == "eval.model_args" and "--eval.model_args token=" in str(err.value)
    assert restore_secrets(from_dict(recorded), ("dataset",))  # a stage that does not use them runs
    assert from_dict({"registry": {"token": MARK}}).registry.token == ""  # no placeholder as a bearer token


def test_a_continued_run_in_a_run_directory_fails_in_one_line(capsys, caplog, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    record = {"config": {"train": {"env_vars": f"WANDB_API_KEY={MARK}"}}, "stages": {}}
    (run_dir / "run.json").write_text(json.dumps(record))
    code, text = _run(capsys, caplog, "train", "-o", str(run_dir))
    error = [line for line in text.splitlines() if "error:" in line]  # the carried-over line shows the placeholder
    assert code == 2 and len(error) == 1 and "train.env_vars" in error[0] and "WANDB_API_KEY" in error[0]
    assert MARK not in error[0]


def test_lm_eval_recorded_config_is_redacted() -> None:
    from lora_pipeline.evaluation.scoring import Scorer

    fake = types.SimpleNamespace(
        cfg=types.SimpleNamespace(tasks=["t"]), tasks=["t"], split_rows=None,
        _lm_eval=lambda lm, record, name: {"config": {"model_args": record}},
    )  # fmt: skip
    result = Scorer.score(fake, "tuned", object(), {"pretrained": "/m", "token": "tok-4242", "api_key": "k-4242"})
    assert result == {"config": {"model_args": {"pretrained": "/m", "token": MARK, "api_key": MARK}}}


def test_secret_type_renders_as_the_placeholder_everywhere() -> None:
    secret = Secret("s3cr3t-4242")
    shown = [str(secret), repr(secret), f"{secret}", f"{secret!r:>20}", yaml.safe_dump({"t": secret}),
             json.dumps({"t": secret}, default=json_default), str(ValueError(secret)), str([secret])]  # fmt: skip
    assert not [s for s in shown if "4242" in s] and secret.reveal() == "s3cr3t-4242"
    assert redact_config(from_dict({"registry": {"token": "s3cr3t-4242"}}).to_dict())["registry"]["token"] == MARK
    assert "4242" not in scrub("token s3cr3t-4242 in a library's message")


# --- property: arbitrary characters ------------------------------------------------------------------------

# Anything a shell argument can hold except what the formats themselves split on: ',' separates KEY=VAL
# pairs, and whitespace ends a URI in free text. A random prefix keeps secrets from matching by chance.
_CHARS = st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=",\\'\"`\x00")
_SECRET = st.builds(lambda tail: "Qx7" + tail, st.text(_CHARS, min_size=8, max_size=24))
# Names that look secret (compile refuses their values); records also hide those of unknown names.
_NAMES = st.sampled_from(["DB_PASS", "MY_PRIVATE_KEY", "GITHUB_PAT", "WANDB_API_KEY", "SVC_CREDENTIAL", "X_AUTH"])
_ARGS = st.sampled_from(["token", "api_key", "hf_pat", "password"])


def _uri(kind: str, user: str, secret: str) -> str:
    return {
        "http-userinfo": f"https://{user}:{secret}@example.org/data.jsonl",
        "s3-userinfo": f"s3://{user}:{secret}@bucket/data.jsonl",
        "http-query": f"https://example.org/data.jsonl?sig={secret}",
        "s3-query": f"s3://bucket/data.jsonl?X-Amz-Security-Token={secret}",
    }[kind]


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.generate])
@given(
    secret=_SECRET,
    kind=st.sampled_from(["http-userinfo", "s3-userinfo", "http-query", "s3-query"]),
    user=st.text(string.ascii_letters, min_size=1, max_size=6),
    name=_NAMES,
    arg=_ARGS,
)
@pytest.mark.integration
def test_no_secret_material_is_written_or_printed(tmp_path_factory, capsys, caplog, secret, kind, user, name, arg):
    tmp = tmp_path_factory.mktemp("p")
    caplog.clear()
    uri = _uri(kind, user, secret)
    secrets = ["--train.env_vars", f"{name}={secret},NCCL_DEBUG=INFO", "--eval.model_args", f"{arg}={secret}"]
    unknown = [
        "--train.env_vars",
        f"{name}={secret},SOME_SETTING={secret}",
        "--eval.model_args",
        f"{arg}={secret},x={secret}",
    ]
    data = write_jsonl(tmp / "chat.jsonl", CHAT_ROWS)
    runs = [
        (["run", "-o", str(tmp / "a"), "--print_config", "--dataset.data_uri", uri, *unknown], 0),
        (["dataset", "-o", str(tmp / "b"), "--dataset.data_uri", str(data), "--registry.token", secret, *unknown], 0),
        (["dataset", "-o", str(tmp / "e"), "--dataset.data_uri", uri.replace("https:", "ftp:"), *secrets], 2),
        (["compile", "-o", str(tmp / "p.yaml"), "--dataset.data_uri", uri], 2),
        (["compile", "-o", str(tmp / "p.yaml"), *secrets], 2),
        (["compile", "--component", "train", "-o", str(tmp / "c.yaml"), *secrets], 2),
        (["compile", "--trainjob", "--dry-run", "-o", str(tmp / "t.yaml"), *secrets], 2),
        (["compile", "-o", str(tmp / "p.yaml"), "--registry.token", secret], 2),
    ]
    for argv, expected in runs:
        code, text = _run(capsys, caplog, *argv)
        assert code == expected, (argv, text)
        assert secret not in text, argv
    written = _written(tmp).replace(data.read_text(), "")
    assert secret not in written
    record = json.loads((tmp / "b" / "run.json").read_text())
    assert record["config"]["eval"]["model_args"] == {arg: MARK, "x": MARK}


def test_redact_uri_never_shows_a_password_holding_separators() -> None:
    for uri in ("s3://AKIA:se/cret@bucket/key", "https://u:p@ss/w@host/x", "https://u:p?ss#w@host/x"):
        assert redact_uri(uri).startswith(("s3://<redacted>@bucket", "https://<redacted>@host")), uri
    assert redact_uri("https://host/@scope/x.jsonl") == "https://host/@scope/x.jsonl"  # a path's @ is not userinfo
    assert Config().registry.token == ""


OVERRIDES = [  # (section, option, as typed on the command line, as recorded in run.json's invocations)
    ("eval", "model_args", "token=t-4242,dtype=bfloat16", f"token={MARK},dtype=bfloat16"),
    ("eval", "model_args", '{"api_key": "k-4242", "max_length": 64}', f"api_key={MARK},max_length=64"),
    ("train", "env_vars", "DB_PASS=p-4242,OMP_NUM_THREADS=4", f"DB_PASS={MARK},OMP_NUM_THREADS=4"),
    ("registry", "token", "r-4242", MARK),
    ("dataset", "data_uri", "https://u:p@ss/w-4242@h/x?sig=s-4242", f"https://{MARK}@h/x?{MARK}"),
]


@pytest.mark.parametrize(("section", "option", "typed", "recorded"), OVERRIDES)
def test_recorded_overrides_are_redacted_by_name_not_by_value(section, option, typed, recorded) -> None:
    assert redact_config({section: {option: typed}}) == {section: {option: recorded}}


def test_an_ambiguous_password_is_never_sent_to_a_host_it_names() -> None:
    from lora_pipeline.errors import SourceError
    from lora_pipeline.sources.http import _split

    with pytest.raises(SourceError) as err:
        _split("https://user:p@ss/w4242@example.org/x.jsonl")  # urllib would read host `ss`, password `p`
    assert "4242" not in str(err.value) and "ss/w" not in str(err.value)
    assert _split("https://user:p%40ss%2Fw@example.org/x.jsonl").hostname == "example.org"


# The pipeline embeds this project's wheel, built first.
@pytest.mark.parametrize("mode", [pytest.param("pipeline", marks=pytest.mark.integration), "trainjob"])
def test_secret_env_mounts_a_kubernetes_secret_by_name(capsys, caplog, tmp_path, mode) -> None:
    out = tmp_path / "out.yaml"
    code, text = _run(capsys, caplog, *_compile_argv(mode, out), "--secret-env", "DB_PASS=db-creds:password")
    assert code == 0, text
    compiled = out.read_text()
    assert "db-creds" in compiled and "DB_PASS" in compiled


@pytest.mark.parametrize(
    ("mode", "value", "message"),
    [
        ("pipeline", "DB_PASS=Hunter2!!", "expected NAME=SECRET:KEY"),
        ("pipeline", "9BAD=db:key", "expected NAME=SECRET:KEY"),
        ("trainjob", "DB_PASS=Db_Creds:key", "expected NAME=SECRET:KEY"),
        ("component", "DB_PASS=db:key", "a component alone has no pod"),
    ],
)
def test_secret_env_bad_values_are_one_line(capsys, caplog, tmp_path, mode, value, message) -> None:
    code, text = _run(capsys, caplog, *_compile_argv(mode, tmp_path / "o.yaml"), "--secret-env", value)
    assert code == 2 and "--secret-env" in text and message in text
    assert "Hunter2" not in text and not (tmp_path / "o.yaml").exists()
