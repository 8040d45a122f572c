"""Tokenized, templated training data on disk (`train.data_output_dir`), keyed by what produced it.

The key hashes the dataset stage's files, the tokenizer's files (vocabulary, merges, chat template), the
sequence limit and this package's version, so a rerun with the same data, tokenizer and template reads
the token ids back instead of rendering and tokenizing every row again. Each key has its own folder,
written atomically: `<dir>/<key>/train.jsonl`, `eval.jsonl` (rows {"input_ids": [...], "labels": [...]}).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from lora_pipeline import __version__
from lora_pipeline.config import TrainConfig
from lora_pipeline.files import atomic_dir, hash_file_into, read_jsonl, write_jsonl
from lora_pipeline.tokenization import IGNORE_INDEX

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")


def encoded_key(dataset_dir: Path, tokenizer_dir: Path | None, chat_template: str | None, max_seq_len: int) -> str:
    digest = hashlib.sha256(f"{__version__}\0{max_seq_len}\0{chat_template or ''}".encode())
    files = [Path(dataset_dir) / f"{split}.jsonl" for split in SPLITS]
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        files += sorted(p for p in Path(tokenizer_dir).iterdir() if p.is_file() and "token" in p.name)
    for path in files:
        if path.exists():
            digest.update(path.name.encode())
            hash_file_into(digest, path)
    return digest.hexdigest()[:16]


def load_encoded(root: Path, key: str) -> tuple[list[dict], list[dict]] | None:
    folder = Path(root) / key
    if not all((folder / f"{split}.jsonl").exists() for split in SPLITS):
        return None
    log.info("train: tokenized data reused from %s", folder)
    return read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "eval.jsonl")


def save_encoded(root: Path, key: str, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> Path:
    with atomic_dir(Path(root) / key) as tmp:
        write_jsonl(train_rows, tmp / "train.jsonl")
        write_jsonl(eval_rows, tmp / "eval.jsonl")
    return Path(root) / key


def encode_rows(rows: list[dict], tokenizer: Any, cfg: TrainConfig) -> list[dict]:
    """Chat rows: loss on the assistant's tokens; plain-text rows ({"text": ...}): loss on every token."""
    from lora_pipeline.tokenization import encode_chat, encode_text

    encoded = [
        encode_text(tokenizer, r["text"], cfg.max_seq_len)
        if "text" in r
        else encode_chat(tokenizer, r["messages"], cfg.max_seq_len)
        for r in rows
    ]
    dropped = sum(e is None for e in encoded)
    if dropped:
        log.warning("train: %d rows have no assistant token within max_seq_len=%d, skipped", dropped, cfg.max_seq_len)
    return [e for e in encoded if e is not None]


def tokens_in(rows: list[dict]) -> int:
    """The tokens of encoded rows, prompt and target."""
    return sum(len(r["input_ids"]) for r in rows)


def targets_in(rows: list[dict]) -> int:
    """The tokens that carry the loss."""
    return sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in rows)
