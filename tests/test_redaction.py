"""Secrets are removed from text and configs before anything is stored or printed."""

from __future__ import annotations

import logging

import pytest

from lora_pipeline.logs import ScrubFilter
from lora_pipeline.redaction import MARK, is_redacted, redact_config, scrub


def test_scrub_removes_uri_credentials_web_query_strings_and_secret_env_values(monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    monkeypatch.setenv("MY_API_KEY", "apikey-98765")
    text = (
        "GET https://u:pw@host:8080/x.jsonl?X-Amz-Signature=abc&Expires=1#frag s3://AKIA:sk@bucket/p "
        "hf://owner/name?split=train token hf_abcdefgh123 key apikey-98765"
    )
    clean = scrub(text)
    for secret in ("u:pw", "X-Amz-Signature", "AKIA:sk", "hf_abcdefgh123", "apikey-98765"):
        assert secret not in clean
    assert f"https://{MARK}@host:8080/x.jsonl?{MARK}#frag" in clean
    assert "hf://owner/name?split=train" in clean  # hf:// options are not secrets
    assert is_redacted(clean) and not is_redacted("plain/path.jsonl")


def test_redact_config_hides_secret_keys_in_key_value_options() -> None:
    config = {
        "dataset": {"data_uri": "http://a:b@h/x?sig=1", "seed": 3},
        "train": {"env_vars": "HF_TOKEN=hf_x,AWS_SECRET_ACCESS_KEY=s,MODE=fast,NCCL_DEBUG=INFO", "lora_r": 8},
        "eval": {
            "model_args": {"token": "t", "dtype": "bfloat16", "add_bos_token": True, "pad_token": "<|pad|>"},
            "gen_kwargs": {"max_tokens": 64, "max_new_tokens": "32"},
            "tasks": ["arc_easy"],
        },
    }
    clean = redact_config(config)
    assert clean["dataset"] == {"data_uri": f"http://{MARK}@h/x?{MARK}", "seed": 3}
    # an unknown name (MODE) is not known to be harmless: its value is not recorded either
    assert clean["train"]["env_vars"] == f"HF_TOKEN={MARK},AWS_SECRET_ACCESS_KEY={MARK},MODE={MARK},NCCL_DEBUG=INFO"
    assert clean["eval"]["model_args"] == {
        "token": MARK,
        "dtype": "bfloat16",
        "add_bos_token": True,
        "pad_token": "<|pad|>",
    }
    assert clean["eval"]["gen_kwargs"] == {"max_tokens": 64, "max_new_tokens": "32"}  # read back on a rerun
    assert config["train"]["env_vars"].startswith("HF_TOKEN=hf_x")  # the live config is untouched


@pytest.mark.parametrize("args", [("downloading %s", "http://u:secret99@h/x"), ("token=%s", "hf_abcdefgh123")])
def test_log_filter_scrubs_messages_and_their_arguments(monkeypatch, args) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefgh123")
    record = logging.LogRecord("lib", logging.WARNING, __file__, 1, args[0], (args[1],), None)
    assert ScrubFilter().filter(record)
    assert "secret99" not in record.getMessage() and "hf_abcdefgh123" not in record.getMessage()


@pytest.mark.parametrize("name", ["PWD", "OLDPWD", "XDG_SESSION_TYPE", "SSH_AUTH_SOCK"])
def test_the_shells_own_variables_are_not_secrets(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A user's working directory stays readable in error lines (PWD's name reads like a password's)."""
    monkeypatch.setenv(name, "/home/someone/project-dir")
    monkeypatch.setenv("DB_PASSWORD", "hunter2-hunter2")
    assert scrub("cannot read /home/someone/project-dir/x.jsonl") == "cannot read /home/someone/project-dir/x.jsonl"
    assert "hunter2" not in scrub("login hunter2-hunter2 failed")
