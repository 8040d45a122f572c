"""Build (once) and cache the offline demo assets: tokenizer + random-init Qwen2 model, data, lm-eval task.

Layout under ``<home>/demo/``::

    model/        save_pretrained dir: config, safetensors weights, tokenizer, chat template
    data/train.jsonl
    task/demo_topic.yaml + demo_topic_test.jsonl   (the YAML points at the data by absolute path)
    BUILD_STAMP   fingerprint of the inputs this directory was built from

The whole directory is built in a temp sibling and renamed into place, so a reader never sees a
half-written demo and the cache check is just "does BUILD_STAMP match". torch/transformers are
imported lazily so that the cache hit stays well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_pipeline.files import owned_prefix, remove_stale_temp

# Bump when the build recipe changes in a way the fingerprint below would not notice.
BUILD_VERSION = "1"
SEED = 0
TASK_NAME = "demo_topic"

PACKAGE_DIR = Path(__file__).resolve().parent
SHIPPED_TRAIN = PACKAGE_DIR / "data" / "train.jsonl"
SHIPPED_TASK_YAML = PACKAGE_DIR / "task" / f"{TASK_NAME}.yaml"
SHIPPED_TEST = PACKAGE_DIR / "task" / f"{TASK_NAME}_test.jsonl"

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML, Qwen-style. The assistant turn (answer + <|im_end|>) sits inside {% generation %} so that
# TRL's assistant_only_loss can mask everything else; learning to emit <|im_end|> is what stops generate().
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Copied from transformers' Qwen2Tokenizer (see _train_tokenizer for why it must match).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Tiny but a real architecture: ~0.7M parameters, ~3 MB on disk. The init is tuned (empirically) for LoRA
# on a *random* base: LoRA only adds low-rank deltas to the linear layers, everything else stays frozen.
#  - an untied LM head with a wide init (HEAD_STD): LoRA never trains the head nor the final norm, so the
#    head's scale bounds the logits; at the default 0.02 no adapter can make the answer token likely and
#    the loss plateaus far above zero.
#  - initializer_range 0.04 (HF default 0.02): the frozen random projections must be large enough for a
#    single LoRA delta to matter, or training sits on a long plateau at the class prior; much larger
#    (0.09+) learned more slowly again.
#  - 8 narrow heads: more distinct random attention patterns for LoRA to sharpen onto the keyword.
VOCAB_SIZE = 1024  # an upper bound: the demo text only supports ~750 BPE tokens
HEAD_STD = 0.5
MODEL_KWARGS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "initializer_range": 0.04,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class DemoAssets:
    model_dir: Path  # HF save_pretrained dir: Qwen2ForCausalLM weights + tokenizer + chat template
    data_file: Path  # training JSONL, one {"messages": [...]} per line
    task_dir: Path  # lm-eval include_path: task YAML + its data file
    task_name: str


def default_home() -> Path:
    return Path(os.environ.get("LORA_PIPELINE_HOME") or Path.home() / ".cache" / "lora-pipeline")


def _assets(demo_dir: Path) -> DemoAssets:
    return DemoAssets(
        model_dir=demo_dir / "model",
        data_file=demo_dir / "data" / "train.jsonl",
        task_dir=demo_dir / "task",
        task_name=TASK_NAME,
    )


def _fingerprint() -> str:
    """Hash of everything the build reads, so edited data or recipe invalidates a stale cache."""
    h = hashlib.sha256(BUILD_VERSION.encode())
    # A different transformers/tokenizers may save differently (e.g. tokenizer_class names), so rebuild.
    for dist in ("transformers", "tokenizers", "torch"):
        h.update(f"{dist}=={importlib.metadata.version(dist)}".encode())
    for path in (Path(__file__), SHIPPED_TRAIN, SHIPPED_TASK_YAML, SHIPPED_TEST):
        h.update(path.read_bytes())
    return h.hexdigest()


def build_demo(home: Path | None = None) -> DemoAssets:
    """Materialise the demo under ``home/demo`` (default ``$LORA_PIPELINE_HOME`` or ~/.cache/lora-pipeline).

    Idempotent and deterministic: a complete, up-to-date build is returned as is; otherwise the
    demo is rebuilt from fixed seeds, giving byte-identical weights and tokenizer every time.
    """
    home = Path(home) if home is not None else default_home()
    demo_dir = home / "demo"
    stamp = _fingerprint()
    stamp_file = demo_dir / "BUILD_STAMP"
    if stamp_file.is_file() and stamp_file.read_text() == stamp:
        return _assets(demo_dir)

    home.mkdir(parents=True, exist_ok=True)
    # Named for their owner: a build or swap cut off by a kill leaves folders the next build removes.
    for prefix in (".demo-tmp-", ".demo-stale-"):
        remove_stale_temp(home, prefix)
    tmp_dir = Path(tempfile.mkdtemp(prefix=owned_prefix(".demo-tmp-"), dir=home))
    try:
        _build_into(tmp_dir, final_dir=demo_dir)
        (tmp_dir / "BUILD_STAMP").write_text(stamp)
        _swap_into_place(tmp_dir, demo_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return _assets(demo_dir)


def _swap_into_place(tmp_dir: Path, demo_dir: Path) -> None:
    """Atomically publish tmp_dir as demo_dir, moving any stale build out of the way first."""
    if demo_dir.exists():
        stale = Path(tempfile.mkdtemp(prefix=owned_prefix(".demo-stale-"), dir=demo_dir.parent))
        with contextlib.suppress(FileNotFoundError):  # a concurrent builder already moved it
            os.replace(demo_dir, stale)  # onto the empty folder just made
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp_dir.rename(demo_dir)
    except OSError:
        # Another process published the same deterministic build first; theirs is as good as ours.
        if not (demo_dir / "BUILD_STAMP").is_file():
            raise


def _build_into(out: Path, final_dir: Path) -> None:
    (out / "data").mkdir(parents=True)
    (out / "task").mkdir()
    shutil.copyfile(SHIPPED_TRAIN, out / "data" / "train.jsonl")
    shutil.copyfile(SHIPPED_TEST, out / "task" / SHIPPED_TEST.name)
    _render_task_yaml(out / "task" / SHIPPED_TASK_YAML.name, final_dir / "task" / SHIPPED_TEST.name)

    tokenizer = _train_tokenizer(_corpus())
    model = _init_model(tokenizer)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")


def _render_task_yaml(dst: Path, data_file: Path) -> None:
    """Copy the shipped task YAML, pointing data_files at the demo's own copy by absolute path."""
    config = yaml.safe_load(SHIPPED_TASK_YAML.read_text())
    config["dataset_kwargs"]["data_files"] = {"test": str(data_file)}
    dst.write_text(
        "# Rendered by lora_pipeline.demo.build_demo from the package's task YAML.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _corpus() -> list[str]:
    """Every string the demo will tokenize: chat turns as rendered (minus special tokens) + eval items."""
    task = yaml.safe_load(SHIPPED_TASK_YAML.read_text())
    texts = [f"{msg['role']}\n{msg['content']}\n" for row in _read_jsonl(SHIPPED_TRAIN) for msg in row["messages"]]
    texts += [f"user\n{row['question']}\n" for row in _read_jsonl(SHIPPED_TEST)]
    texts += [f"assistant\n{choice}\n" for choice in task["doc_to_choice"]]
    texts += ["system\nYou are a helpful assistant.\n"]
    return texts


def _train_tokenizer(texts: list[str]):  # -> PreTrainedTokenizerFast
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with Qwen2's exact normalizer/pre-tokenizer: AutoTokenizer maps model_type "qwen2"
    # to Qwen2Tokenizer, which rebuilds this pipeline from vocab+merges on load, so mirroring it here
    # makes the saved tokenizer round-trip to identical ids.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[PAD_TOKEN, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,  # Qwen2Tokenizer's default; byte-level BPE never actually emits it
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
    )


def _init_model(tokenizer):  # -> Qwen2ForCausalLM
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **MODEL_KWARGS,
    )
    # fork_rng: seed the init without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
        # Wider LM head than the rest (see HEAD_STD): it sets the logit range a LoRA can reach.
        torch.nn.init.normal_(model.get_output_embeddings().weight, std=HEAD_STD)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, do_sample=False, max_new_tokens=16
    )
    return model
