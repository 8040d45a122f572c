"""A run directory a person can trust: one process at a time, it owns its config, its cache is honest,
and no secret is ever stored or printed. Fast: these use the dataset stage only (no model)."""

from __future__ import annotations

import http.server
import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CHAT_ROWS, run_cli, write_jsonl
from helpers import loopback_server
from lora_pipeline.cache_keys import stage_key
from lora_pipeline.config import Config, TrainConfig
from lora_pipeline.files import exclusive_lock, read_json
from lora_pipeline.stages import BY_NAME


def statuses(run_dir: Path) -> dict[str, str]:
    return {name: info["status"] for name, info in read_json(run_dir / "run.json")["stages"].items()}


@pytest.mark.integration
def test_second_process_on_the_same_run_is_refused_naming_the_holder(chat_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with exclusive_lock(run_dir / ".lock", what=f"run directory {run_dir}"):
        out = run_cli("dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"lora-pipeline: error: run directory {run_dir} is in use by another lora-pipeline process (pid {os.getpid()})"
    ]
    assert not (run_dir / "dataset").exists()
    ok = run_cli("dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file))  # released: runs
    assert ok.returncode == 0, ok.stderr
    assert not (run_dir / ".lock").exists()


@pytest.mark.integration
def test_lock_is_released_by_a_killed_holder(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from lora_pipeline.files import exclusive_lock\n"
        "with exclusive_lock(Path(sys.argv[1]), 'x'):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=10)
    with exclusive_lock(tmp_path / ".lock", "x"):  # the kernel dropped the dead holder's flock
        pass


@pytest.mark.integration
def test_run_directory_owns_its_config_and_records_overrides(chat_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = run_cli("dataset", "-o", str(run_dir), "--dataset.data_uri", str(chat_file), "--dataset.seed", "7")
    assert first.returncode == 0, first.stderr
    again = run_cli("dataset", "-o", str(run_dir))  # no options: the recorded config, so cached
    assert again.returncode == 0, again.stderr
    assert statuses(run_dir) == {"dataset": "cached"}
    carried = f"carried over from {run_dir}/run.json: dataset.data_uri={chat_file}, dataset.seed=7 (--fresh drops them)"
    assert carried in again.stderr
    changed = run_cli("dataset", "-o", str(run_dir), "--dataset.data_split", "0.5")
    assert changed.returncode == 0, changed.stderr
    record = read_json(run_dir / "run.json")
    assert record["config"]["dataset"]["seed"] == 7 and record["config"]["dataset"]["data_split"] == 0.5
    assert record["config"]["dataset"]["data_uri"] == str(chat_file)
    assert record["stages"]["dataset"]["status"] == "ran" and record["status"] == "completed"
    assert [i["overrides"] for i in record["invocations"]] == [
        {"dataset": {"data_uri": str(chat_file), "seed": "7"}},
        {},
        {"dataset": {"data_split": "0.5"}},
    ]
    shown = run_cli("train", "-o", str(run_dir), "--print_config")  # a stage command starts from the record
    assert "seed: 7" in shown.stdout and f"data_uri: {chat_file}" in shown.stdout


@pytest.mark.integration
def test_cache_follows_content_not_mtime(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", CHAT_ROWS)
    run_dir = tmp_path / "run"
    args = ("dataset", "-o", str(run_dir), "--dataset.data_uri", str(data))
    assert run_cli(*args).returncode == 0
    os.utime(data, (time.time() + 100, time.time() + 100))  # touch: same bytes
    assert run_cli(*args).returncode == 0 and statuses(run_dir) == {"dataset": "cached"}
    write_jsonl(data, CHAT_ROWS[:30])  # edited
    assert run_cli(*args).returncode == 0 and statuses(run_dir) == {"dataset": "ran"}
    assert read_json(run_dir / "dataset" / "dataset.json")["rows_used"] == 30


@pytest.mark.integration
def test_directory_source_edited_in_place_reruns(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", CHAT_ROWS[:20])
    write_jsonl(src / "b.jsonl", CHAT_ROWS[20:])
    run_dir = tmp_path / "run"
    args = ("dataset", "-o", str(run_dir), "--dataset.data_uri", str(src))
    assert run_cli(*args).returncode == 0
    assert run_cli(*args).returncode == 0 and statuses(run_dir) == {"dataset": "cached"}
    with open(src / "b.jsonl", "r+b") as fh:  # same size, same mtime: content is what counts
        st = os.stat(src / "b.jsonl")
        body = fh.read().replace(b"What is 3", b"What is 9")
        fh.seek(0)
        fh.write(body)
    os.utime(src / "b.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert run_cli(*args).returncode == 0 and statuses(run_dir) == {"dataset": "ran"}


class _Server:
    """Serves `body` at /data.jsonl, with an ETag of its content; the credentials and query are ignored."""

    def __init__(self) -> None:
        self.body = b""
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _head(self) -> bool:
                outer.requests.append(self.command)
                if not self.path.startswith("/data.jsonl"):
                    self.send_response(500 if "fail" in self.path else 404)
                    self.end_headers()
                    return False
                self.send_response(200)
                self.send_header("ETag", f'"{hash(outer.body) & 0xFFFFFFFF:x}"')
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                return True

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self._head()

            def do_GET(self) -> None:  # noqa: N802
                if self._head():
                    self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.handler = Handler
        self.port = 0  # the fixture's server's


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    with loopback_server(s.handler) as served:
        s.port = served.server_address[1]
        yield s


@pytest.mark.integration
def test_http_source_whose_content_changed_reruns(server: _Server, tmp_path: Path) -> None:
    server.body = "".join(json.dumps(r) + "\n" for r in CHAT_ROWS).encode()
    run_dir = tmp_path / "run"
    args = ("dataset", "-o", str(run_dir), "--dataset.data_uri", f"http://127.0.0.1:{server.port}/data.jsonl")
    assert run_cli(*args).returncode == 0
    assert run_cli(*args).returncode == 0 and statuses(run_dir) == {"dataset": "cached"}
    server.body = "".join(json.dumps(r) + "\n" for r in CHAT_ROWS[:10]).encode()
    assert run_cli(*args).returncode == 0 and statuses(run_dir) == {"dataset": "ran"}


def test_options_that_do_not_change_the_output_keep_the_key(tmp_path: Path) -> None:
    base = Config()
    train = BY_NAME["train"]
    key = stage_key(base, train, tmp_path)
    for name, value in {"memory": "64Gi", "cpu": "16", "labels": "team=a", "annotations": "x=y"}.items():
        other = Config(train=TrainConfig(**{name: value}))
        assert stage_key(other, train, tmp_path) == key, name
    assert stage_key(Config(train=TrainConfig(lora_r=8)), train, tmp_path) != key


SECRETS = ("secretpw", "SIGTOKEN123", "hf_SECRETVALUE42", "AWSSECRETKEY999", "envsecret77")


@pytest.mark.integration
def test_no_secret_is_stored_or_printed(server: _Server, tmp_path: Path) -> None:
    server.body = "".join(json.dumps(r) + "\n" for r in CHAT_ROWS).encode()
    uri = f"http://user:secretpw@127.0.0.1:{server.port}/data.jsonl?sig=SIGTOKEN123"
    env = {"HF_TOKEN": "hf_SECRETVALUE42", "AWS_SECRET_ACCESS_KEY": "AWSSECRETKEY999"}
    run_dir = tmp_path / "run"
    flags = ["--dataset.data_uri", uri, "--train.env_vars", "HF_TOKEN=envsecret77,NCCL_DEBUG=INFO"]
    outputs = [run_cli("dataset", "-o", str(run_dir), *flags, env=env)]
    assert outputs[0].returncode == 0, outputs[0].stderr
    outputs.append(run_cli("run", "-o", str(run_dir), *flags, "--print_config", env=env))
    assert "<redacted>" in outputs[1].stdout and "NCCL_DEBUG=INFO" in outputs[1].stdout
    outputs.append(run_cli("dataset", "-o", str(run_dir), env=env))  # continue: the recorded URI lost its secrets
    assert outputs[2].returncode == 0 and statuses(run_dir) == {"dataset": "cached"}
    failing = uri.replace("data.jsonl", "fail.jsonl")  # a failed run must not leak either
    outputs.append(run_cli("dataset", "-o", str(tmp_path / "bad"), "--dataset.data_uri", failing, env=env))
    assert outputs[3].returncode == 2
    for out in outputs:
        for secret in SECRETS:
            assert secret not in out.stdout + out.stderr, secret
    for path in run_dir.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}"  # private: 0600 files, 0700 directories
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            for secret in SECRETS:
                assert secret not in text, (secret, path)


@pytest.mark.integration
def test_recorded_uri_without_its_credentials_must_be_given_again(server: _Server, tmp_path: Path) -> None:
    server.body = "".join(json.dumps(r) + "\n" for r in CHAT_ROWS).encode()
    uri = f"http://user:pw12345@127.0.0.1:{server.port}/data.jsonl"
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    record = {"config": {"dataset": {"data_uri": uri.replace("user:pw12345", "<redacted>")}}, "stages": {}}
    (run_dir / "run.json").write_text(json.dumps(record))
    out = run_cli("dataset", "-o", str(run_dir))
    assert out.returncode == 2
    assert "dataset.data_uri" in out.stderr and "give --dataset.data_uri again" in out.stderr
    assert run_cli("dataset", "-o", str(run_dir), "--dataset.data_uri", uri).returncode == 0


@pytest.mark.integration
def test_kubernetes_only_options_are_named_and_recorded_on_a_local_run(chat_file: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    flags = ["--train.memory", "64Gi", "--train.labels", "team=nlp", "--dataset.data_uri", str(chat_file)]
    out = run_cli("dataset", "-o", str(run_dir), *flags)
    assert out.returncode == 0, out.stderr
    assert "train.memory=64Gi, train.labels=team=nlp: applies on Kubernetes only" in out.stderr
    assert read_json(run_dir / "run.json")["kubernetes_only"] == {"train.memory": "64Gi", "train.labels": "team=nlp"}


def test_env_vars_are_set_while_training_and_restored(monkeypatch, tmp_path: Path) -> None:
    from lora_pipeline.stages import train

    seen = {}
    monkeypatch.setenv("KEEP_ME", "before")
    monkeypatch.delenv("NEW_ONE", raising=False)
    monkeypatch.setattr(train, "_train", lambda cfg, d, o: seen.update(os.environ) or o)
    train.train_adapter(TrainConfig(env_vars="KEEP_ME=during,NEW_ONE=1"), tmp_path, tmp_path / "out")
    assert (seen["KEEP_ME"], seen["NEW_ONE"]) == ("during", "1")
    assert os.environ["KEEP_ME"] == "before" and "NEW_ONE" not in os.environ
