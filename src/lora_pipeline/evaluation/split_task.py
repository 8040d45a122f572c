"""The `split` eval task: the run's own held-out rows (the dataset stage's eval.jsonl), scored offline.

Chat rows ({"messages": [...]}) give the loss and perplexity on the assistant tokens, encoded exactly as
training encoded them (same chat template, end-of-turn marker included), and the exact match of the last
assistant answer generated greedily from the conversation before it. Plain-text rows ({"text": ...}) give
only the loss (on every token, as trained): they have no answer to match. The results use lm-eval's layout
(results[task]["metric,filter"]) so the comparison table shows them beside lm-eval's tasks.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lora_pipeline.errors import StageError
from lora_pipeline.evaluation.backends import MAX_TOKEN_KEYS
from lora_pipeline.files import read_jsonl
from lora_pipeline.progress import TerminalLine, WorkProgress
from lora_pipeline.tokenization import IGNORE_INDEX, encode_chat, encode_text, render_chat, stop_token_ids

log = logging.getLogger(__name__)

TASK = "split"
# Without a max-token key in gen_kwargs, an answer may be this many tokens longer than the reference: enough
# to see whether the model stops where the reference does, without generating pages from an untuned base.
EXTRA_TOKENS = 16
MAX_NEW_TOKENS = 512


def load_rows(path: Path, limit: int) -> list[dict]:
    rows = read_jsonl(path)
    rows = [r for r in rows if isinstance(r.get("messages"), list) or isinstance(r.get("text"), str)]
    if limit > 0:
        rows = rows[:limit]
    if not rows:
        raise StageError(f"task {TASK!r}: no chat or text rows in {path}", field="eval.tasks")
    return rows


def max_new_tokens(gen_kwargs: dict[str, Any]) -> int | None:
    """The max-token value of gen_kwargs, under any of the names lm-eval accepts (None: not given)."""
    for key in MAX_TOKEN_KEYS:
        if gen_kwargs.get(key) is not None:
            return int(gen_kwargs[key])
    return None


def score_split(
    model: Any, tokenizer: Any, rows: list[dict], batch_size: int, max_tokens: int | None, log_samples: bool
) -> dict[str, Any]:
    """lm-eval-shaped results of one model on the rows: loss, perplexity, exact match (+ samples)."""
    import copy

    import torch

    from lora_pipeline.tokenization import ensure_chat_template

    if not getattr(tokenizer, "chat_template", None) or tokenizer.pad_token is None:
        # An adapter saved without a template was trained on ChatML (ensure_chat_template): score it so too,
        # on a copy, leaving lm-eval's tokenizer as it is.
        tokenizer = copy.deepcopy(tokenizer)
        ensure_chat_template(tokenizer)
    model.eval()
    samples = [_encode(tokenizer, row, i) for i, row in enumerate(rows)]
    samples = [s for s in samples if s is not None]
    if not samples:
        raise StageError(f"task {TASK!r}: no row has a token to score", field="eval.tasks")
    chats = [s for s in samples if s["prompt_ids"] is not None]
    live = TerminalLine() if os.isatty(2) else None
    # requests as lm-eval counts them: each row's loss, then each chat row's greedy answer
    progress = WorkProgress(log, f"eval: {TASK}", len(samples) + len(chats), live=live)
    with torch.no_grad():
        try:
            for batch in _batches(samples, batch_size):
                _losses(model, tokenizer, batch)
                progress.update(len(batch))
            for batch in _batches(chats, batch_size):
                _generate(model, tokenizer, batch, max_tokens)
                progress.update(len(batch))
        finally:
            progress.close()

    tokens = sum(s["tokens"] for s in samples)
    loss = sum(s["nll"] for s in samples) / tokens
    metrics: dict[str, Any] = {"alias": TASK, "loss,none": loss, "perplexity,none": math.exp(min(loss, 700.0))}
    higher_is_better = {"loss": False, "perplexity": False}
    if chats:
        em = sum(s["exact_match"] for s in chats) / len(chats)
        metrics["exact_match,none"] = em
        # lm-eval's stderr of a mean of 0/1 scores (sample standard deviation over sqrt(n))
        n = len(chats)
        metrics["exact_match_stderr,none"] = math.sqrt(em * (1 - em) / (n - 1)) if n > 1 else "N/A"
        higher_is_better["exact_match"] = True
    result: dict[str, Any] = {
        "results": {TASK: metrics},
        "higher_is_better": {TASK: higher_is_better},
        "n-samples": {TASK: {"original": len(rows), "effective": len(samples)}},
    }
    if log_samples:
        result["samples"] = {TASK: [_sample_row(s) for s in samples]}
    return result


def merge(lm_eval_results: dict | None, split: dict) -> dict:
    """lm-eval's results for the other tasks with the split task's added under the same keys."""
    merged = dict(lm_eval_results or {})
    for key in ("results", "higher_is_better", "n-samples", "samples"):
        if key in split:
            merged[key] = {**(merged.get(key) or {}), **split[key]}
    return merged


def _encode(tokenizer: Any, row: dict, index: int) -> dict | None:
    """Token ids with labels as training made them, and for chat rows the prompt before the last answer."""
    limit = 1 << 30  # no truncation: the whole held-out row is scored
    if "messages" in row:
        messages = row["messages"]
        enc = encode_chat(tokenizer, messages, limit)
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        prompt = None
        if last is not None:
            text = render_chat(tokenizer, messages[:last], add_generation_prompt=True)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = messages[last]["content"] if last is not None else None
    else:
        enc, prompt, target = encode_text(tokenizer, row["text"], limit), None, None
    if enc is None:
        return None
    tokens = sum(label != IGNORE_INDEX for label in enc["labels"][1:])  # the first token has no prediction
    if not tokens:
        return None
    return {"doc_id": index, **enc, "tokens": tokens, "prompt_ids": prompt, "target": target}


def _batches(items: list[dict], size: int) -> list[list[dict]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _losses(model: Any, tokenizer: Any, batch: list[dict]) -> None:
    """Summed negative log-likelihood of each row's labelled tokens (right-padded batch)."""
    import torch.nn.functional as F

    from lora_pipeline.tokenization import PadCollator

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = PadCollator(pad)(batch)
    labels = inputs.pop("labels")
    logits = model(**{k: v.to(_device(model)) for k, v in inputs.items()}).logits.float().cpu()
    nll = F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    ).sum(dim=1)
    for sample, value in zip(batch, nll.tolist(), strict=True):
        sample["nll"] = value


def _generate(model: Any, tokenizer: Any, batch: list[dict], max_tokens: int | None) -> None:
    """Greedy answers for a left-padded batch of prompts, cut at the end of the assistant's turn."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(s["prompt_ids"]) for s in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, s in enumerate(batch):
        n = len(s["prompt_ids"])
        ids[i, width - n :] = torch.tensor(s["prompt_ids"])
        mask[i, width - n :] = 1
    if max_tokens is None:
        longest = max(len(tokenizer(s["target"], add_special_tokens=False)["input_ids"]) for s in batch)
        max_tokens = min(MAX_NEW_TOKENS, longest + EXTRA_TOKENS)
    stops = stop_token_ids(tokenizer)
    device = _device(model)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=pad,
    )
    for s, row in zip(batch, out[:, width:].tolist(), strict=True):
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        s["response"] = tokenizer.decode(row[:cut], skip_special_tokens=True)
        s["exact_match"] = float(s["response"].strip() == s["target"].strip())


def _sample_row(s: dict) -> dict:
    row = {"doc_id": s["doc_id"], "tokens": s["tokens"], "loss": s["nll"] / s["tokens"]}
    if s.get("target") is not None:
        row.update(target=s["target"], response=s.get("response"), exact_match=s.get("exact_match"))
    return json.loads(json.dumps(row))
