"""`--train.chat_template NAME|PATH` and `lora-pipeline preview` (the trained tokens marked)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHAT_ROWS, write_jsonl
from lora_pipeline.chat_templates import BUILTIN_TEMPLATES, resolve_template
from lora_pipeline.cli import main
from lora_pipeline.preview import PLAIN_MARKS, render_row

MARKED = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
# What each built-in template writes around an answer when the demo tokenizer (EOS <|im_end|>) renders it.
AROUND_ANSWER = {
    "chatml": ("", "<|im_end|>\n"),
    "llama3": ("", "<|eot_id|>"),
    "mistral": (" ", "<|im_end|>"),
    "zephyr": ("", "<|im_end|>\n"),
}


def one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture
def bare_model(demo_assets, tmp_path: Path) -> Path:
    """The demo model with its chat template taken out, as a base model ships."""
    model = tmp_path / "bare-model"
    shutil.copytree(demo_assets.model_dir, model)
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def demo_tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets.model_dir)


def test_builtin_names_cover_the_table() -> None:
    assert set(AROUND_ANSWER) == set(BUILTIN_TEMPLATES)
    for name, text in BUILTIN_TEMPLATES.items():
        assert resolve_template(name.upper()) == text


def test_template_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_TEMPLATES["zephyr"].replace("<|", "<<|"))
    assert resolve_template(str(path)) == path.read_text()


words = st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8), min_size=1, max_size=6)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@settings(max_examples=30, deadline=None)
@given(question=words, answer=words)
def test_preview_marks_exactly_the_answer_and_end_of_turn(
    name: str, question: list[str], answer: list[str], demo_tokenizer
) -> None:
    import copy

    tokenizer = copy.copy(demo_tokenizer)
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]
    content = " ".join(answer)
    row = {"messages": [{"role": "user", "content": " ".join(question)}, {"role": "assistant", "content": content}]}
    _, shown = render_row(tokenizer, row, 4096, PLAIN_MARKS)
    before, after = AROUND_ANSWER[name]
    assert MARKED.findall(shown) == [before + content + after]
    assert MARKED.sub(r"\1", shown) == tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_preview_of_a_run_directory(demo_assets, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    run = tmp_path / "run"
    argv = ["dataset", "-o", str(run), "--dataset.data_uri", str(data), "--train.model", str(demo_assets.model_dir)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["preview", "-o", str(run), "--rows", "2", "--color", "never"]) == 0
    out = capsys.readouterr().out
    rows = out.split("--- row ")[1:]
    assert out.startswith("legend: [[trained]]") and len(rows) == 2
    for shown in rows:
        number = int(re.search(r"What is (\d+) plus", shown).group(1))
        assert MARKED.findall(shown) == [f"{2 * number}<|im_end|>\n"]


def test_preview_with_a_template_for_a_bare_model(bare_model: Path, chat_file: Path, capsys) -> None:
    argv = ["preview", "--dataset.data_uri", str(chat_file), "--train.model", str(bare_model), "--rows", "1"]
    assert "train.chat_template" in one_line(capsys, [*argv, "--color", "never"])
    assert main([*argv, "--train.chat_template", "llama3", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "<|start_header_id|>user<|end_header_id|>" in out
    assert MARKED.findall(out)[1].endswith("<|eot_id|>")  # [0] is the legend


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("no-such-template", "neither a built-in template"),
        ("{dir}/missing.jinja", "neither a built-in template"),
        ("{empty}", "is empty"),
        ("{syntax}", "fails to render: TemplateSyntaxError"),
        ("{raises}", "fails to render"),
        ("{silent}", "does not render the messages' content"),
    ],
)
def test_bad_chat_template_fails_preflight(value: str, needle: str, demo_assets, tmp_path: Path, capsys) -> None:
    files = {
        "empty": "  \n",
        "syntax": "{% for m in messages %}",
        "raises": "{{ raise_exception('no') }}",
        "silent": "{% for m in messages %}{{ m.role }}{% endfor %}",
    }
    for key, text in files.items():
        (tmp_path / f"{key}.jinja").write_text(text)
    paths = {key: str(tmp_path / f"{key}.jinja") for key in files}
    (tmp_path / "ds").mkdir()
    argv = ["train", "--input", f"dataset={tmp_path / 'ds'}", "--out", str(tmp_path / "tr")]
    argv += ["--train.model", str(demo_assets.model_dir), "--train.chat_template", value.format(dir=tmp_path, **paths)]
    line = one_line(capsys, argv)
    assert "train.chat_template" in line and needle in line
    assert not (tmp_path / "tr").exists()


def test_bare_model_without_option(bare_model: Path, chat_file: Path, tmp_path: Path, capsys) -> None:
    """A chat dataset declared as such is refused in pre-flight; `auto` data is refused when the train stage
    renders the first conversation, before any weight loads."""
    (tmp_path / "ds").mkdir()
    argv = ["train", "--input", f"dataset={tmp_path / 'ds'}", "--out", str(tmp_path / "tr")]
    line = one_line(capsys, [*argv, "--train.model", str(bare_model), "--dataset.format", "messages"])
    assert "has no chat template" in line and "--train.chat_template" in line
    assert main(["dataset", "--dataset.data_uri", str(chat_file), "--out", str(tmp_path / "ds2")]) == 0
    capsys.readouterr()
    argv = ["train", "--input", f"dataset={tmp_path / 'ds2'}", "--out", str(tmp_path / "tr2")]
    line = one_line(capsys, [*argv, "--train.model", str(bare_model)])
    assert "has no chat template" in line and "--train.chat_template" in line


@pytest.mark.integration
def test_chosen_template_is_saved_and_used_by_chat(bare_model: Path, chat_file: Path, tmp_path: Path, capsys) -> None:
    assert main(["dataset", "--dataset.data_uri", str(chat_file), "--out", str(tmp_path / "ds")]) == 0
    argv = ["train", "--input", f"dataset={tmp_path / 'ds'}", "--out", str(tmp_path / "tr"), "--train.epochs", "1"]
    argv += ["--train.model", str(bare_model), "--train.chat_template", "llama3", "--train.max_seq_len", "128"]
    argv += ["--train.lora_load_in_4bit", "false", "--train.effective_batch_size", "8", "--train.threads", "1"]
    assert main(argv) == 0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "tr" / "adapter").chat_template == BUILTIN_TEMPLATES["llama3"]
    from lora_pipeline.chat import Chat

    chat = Chat(tmp_path / "tr")
    rendered = chat.tokenizer.decode(chat.prompt_ids("hi")[0])
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert rendered == header.format("user") + "hi<|eot_id|>" + header.format("assistant")
    capsys.readouterr()
    assert main(["chat", "-o", str(tmp_path / "tr"), "--prompt", "hi", "--max_new_tokens", "3"]) == 0


def test_train_cache_key_follows_the_template_file(demo_assets, tmp_path: Path) -> None:
    from lora_pipeline.cache_keys import stage_key
    from lora_pipeline.config import Config
    from lora_pipeline.stages import BY_NAME

    path = tmp_path / "t.jinja"
    path.write_text(BUILTIN_TEMPLATES["chatml"])
    config = Config()
    config.train.model, config.train.chat_template = str(demo_assets.model_dir), str(path)
    before = stage_key(config, BY_NAME["train"], tmp_path / "run")
    assert stage_key(config, BY_NAME["train"], tmp_path / "run") == before
    path.write_text(BUILTIN_TEMPLATES["zephyr"])
    assert stage_key(config, BY_NAME["train"], tmp_path / "run") != before


def test_preview_of_a_text_row_marks_every_token(demo_tokenizer) -> None:
    header, shown = render_row(demo_tokenizer, {"text": "plain words here"}, 128, PLAIN_MARKS)
    assert MARKED.findall(shown) == ["plain words here<|im_end|>"] and "cut at" not in header
    header, _ = render_row(demo_tokenizer, {"text": "plain words here and more"}, 2, PLAIN_MARKS)
    assert header.startswith("2 tokens, 2 trained (cut at train.max_seq_len 2)")
