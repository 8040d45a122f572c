"""Chat rows -> token ids with labels on the assistant's tokens only.

The conversation is rendered once with the tokenizer's chat template; each assistant turn's character
span is found by rendering the prefix up to it (with the generation prompt) and up to its end, so the
end-of-turn marker is trained too (the model must learn to stop). Tokens are mapped to spans through the
fast tokenizer's offsets, which avoids the merges that tokenising pieces separately would get wrong.
"""

from __future__ import annotations

import logging
from typing import Any

from lora_pipeline.chat_templates import BUILTIN_TEMPLATES, no_template_message
from lora_pipeline.errors import StageError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Used only for an adapter saved without a template (trained before `train.chat_template` existed, when a base
# without one was trained on ChatML): eval scores it the same way.
DEFAULT_CHAT_TEMPLATE = BUILTIN_TEMPLATES["chatml"]


def ensure_chat_template(tokenizer: Any) -> bool:
    """Give the tokenizer a chat template and a pad token if it lacks them; True if a template was added."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    log.warning("the adapter's tokenizer has no chat template: using ChatML, as it was trained")
    return True


def render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation through the model's chat template. A template is code shipped with the model: one that
    raises (`raise_exception(...)`, a syntax error, a missing variable) is one StageError naming it; a tokenizer
    without one is a StageError naming `train.chat_template`."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise StageError(no_template_message(name), field="train.chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's errors, and whatever the template's expressions raise
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise StageError(
            f"the chat template of {name} fails on a conversation: {type(exc).__name__}: {exc}", field="train.model"
        ) from None


def assistant_spans(tokenizer: Any, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of the assistant turns."""
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1])
        if text.startswith(upto) and upto.startswith(prompt):
            start, end = len(prompt), len(upto)
        else:
            # Templates that rewrite earlier turns (e.g. drop reasoning): fall back to the content itself.
            start = text.find(message["content"], spans[-1][1] if spans else 0)
            if start < 0:
                continue
            end = start + len(message["content"])
        spans.append((start, end))
    return text, spans


def encode_chat(tokenizer: Any, messages: list[dict], max_seq_len: int) -> dict[str, list[int]] | None:
    """input_ids/labels for one conversation, truncated to max_seq_len; None when no target token is left."""
    _, _, ids, labels = chat_tokens(tokenizer, messages, max_seq_len)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def chat_tokens(
    tokenizer: Any, messages: list[dict], max_seq_len: int
) -> tuple[str, list[tuple[int, int]], list[int], list[int]]:
    """The rendered text, and its kept tokens' character offsets, ids and labels (what `preview` shows)."""
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    ids = enc["input_ids"][:max_seq_len]
    offsets = [tuple(o) for o in enc["offset_mapping"][:max_seq_len]]
    labels = []
    for token_id, (start, end) in zip(ids, offsets, strict=False):
        inside = any(s <= start and end <= e and end > start for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return text, offsets, ids, labels


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the chat template's end-of-turn token: the first token the template writes after an answer."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    probe = "PROBE-ANSWER"
    text = render_chat(tokenizer, [{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}])
    after = text[text.rfind(probe) + len(probe) :]
    if after.strip():
        first = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
        stops += [t for t in first if t not in stops]
    return stops


def encode_text(tokenizer: Any, text: str, max_seq_len: int) -> dict[str, list[int]] | None:
    """input_ids/labels for a plain-text row: no chat template, loss on every token, ending with EOS."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    ids = ids[:max_seq_len]
    return {"input_ids": ids, "labels": list(ids)} if len(ids) > 1 else None


class PadCollator:
    """Right-pads a micro-batch to its longest row (dynamic padding); labels pad with IGNORE_INDEX."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
