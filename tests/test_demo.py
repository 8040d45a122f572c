"""The offline demo assets: deterministic, cached, loadable, and a well-formed lm-eval task."""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from lora_pipeline.demo import DEMO_OVERRIDES, DemoAssets, build_demo, make_data

CHOICES = ["animal", "fruit", "tool", "vehicle", "instrument"]
PACKAGE_DIR = Path(make_data.__file__).parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo(tmp_path_factory.mktemp("home"))


def test_build_is_deterministic(assets: DemoAssets, tmp_path: Path) -> None:
    other = build_demo(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert _sha(assets.model_dir / name) == _sha(other.model_dir / name), name


def test_second_call_is_a_fast_cache_hit(assets: DemoAssets) -> None:
    home = assets.model_dir.parent.parent
    mtime = (assets.model_dir / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    again = build_demo(home)
    assert time.perf_counter() - started < 0.5
    assert again == assets
    assert (assets.model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in home.iterdir() if p.name.startswith(".demo-")], "temp dirs left behind"


def test_home_defaults_to_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, assets: DemoAssets) -> None:
    # Reuse the module build (copy) so this stays a cache hit rather than a second full build.
    shutil.copytree(assets.model_dir.parent, tmp_path / "demo")
    monkeypatch.setenv("LORA_PIPELINE_HOME", str(tmp_path))
    got = build_demo()
    assert got.model_dir == tmp_path / "demo" / "model"


@pytest.mark.integration
def test_model_and_tokenizer_load_and_generate(assets: DemoAssets) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which category? The dog was here."}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_chat_template_and_choice_tokens(assets: DemoAssets) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    messages = [{"role": "user", "content": "Sentence: The cat sat."}, {"role": "assistant", "content": "animal"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nSentence: The cat sat.<|im_end|>\n<|im_start|>assistant\nanimal<|im_end|>\n"

    # {% generation %} marks exactly the answer + <|im_end|> (what TRL's assistant_only_loss trains on).
    enc = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.convert_ids_to_tokens(trained) == ["animal", "<|im_end|>"]

    # lm-eval scores context = prompt + generation prompt, continuation = choice (target_delimiter ""):
    # the continuation's tokens must be the very tokens the assistant turn is trained on.
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    for choice in CHOICES:
        whole = tokenizer(prompt + choice)["input_ids"]
        context = tokenizer(prompt)["input_ids"]
        assert whole[: len(context)] == context
        assert tokenizer.convert_ids_to_tokens(whole[len(context) :]) == [choice]


def test_task_yaml_loads_in_lm_eval(assets: DemoAssets) -> None:
    from lm_eval.tasks import TaskManager

    config = yaml.safe_load((assets.task_dir / f"{assets.task_name}.yaml").read_text())
    data_file = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data_file.is_absolute() and data_file.is_file()
    assert config["doc_to_choice"] == CHOICES and config["target_delimiter"] == ""

    manager = TaskManager(include_path=str(assets.task_dir), include_defaults=False)
    assert assets.task_name in manager.all_tasks


def test_data_files_parse_and_are_balanced(assets: DemoAssets) -> None:
    train = _read_jsonl(assets.data_file)
    assert 300 <= len(train) <= 1000
    for row in train:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] and row["messages"][1]["content"] in CHOICES
    train_counts = collections.Counter(r["messages"][1]["content"] for r in train)
    assert len(set(train_counts.values())) == 1 and set(train_counts) == set(CHOICES)

    test = _read_jsonl(assets.task_dir / "demo_topic_test.jsonl")
    test_counts = collections.Counter(r["label"] for r in test)
    assert set(test_counts) == set(range(len(CHOICES))) and len(set(test_counts.values())) == 1
    assert all(CHOICES[r["label"]] == r["answer"] for r in test)
    # Held out: no eval sentence occurs in training.
    train_text = "\n".join(r["messages"][0]["content"] for r in train)
    assert not [r for r in test if r["sentence"] in train_text]


def test_shipped_data_matches_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(make_data, "TRAIN_FILE", tmp_path / "train.jsonl")
    monkeypatch.setattr(make_data, "TEST_FILE", tmp_path / "test.jsonl")
    make_data.main()
    assert _sha(tmp_path / "train.jsonl") == _sha(PACKAGE_DIR / "data" / "train.jsonl")
    assert _sha(tmp_path / "test.jsonl") == _sha(PACKAGE_DIR / "task" / "demo_topic_test.jsonl")


def test_overrides_are_valid_config_options() -> None:
    from lora_pipeline.config import from_dict  # unknown keys raise

    config = from_dict(DEMO_OVERRIDES)
    assert config.train.lora_load_in_4bit is False
    assert config.train.learning_rate == DEMO_OVERRIDES["train"]["learning_rate"]
