"""Padding-free micro-batches and sample packing.

Padding-free: a micro-batch is its rows laid end to end in one sequence (batch size 1), with position ids that
restart at each row and attention that never crosses from one row into another. Nothing is padded, and each
row's logits are the ones it gets on its own, so the loss is the same as with padded batches (a test shows
per-row losses equal within 1e-4); only the time differs. Attention (`varlen_sdpa_attention`) runs:
  - on CUDA in bf16/fp16, through torch's own varlen flash-attention (`torch.nn.attention.varlen`, torch >= 2.10):
    one kernel per layer over all rows, no host sync;
  - through the flash-attn package's varlen kernel instead, when it is installed (transformers drives it);
  - elsewhere (CPU, older torch), row by row: torch's SDPA on each row's slice.
On an H200 the row-by-row path left the GPU nearly idle (about 1.3 ms of host time per SDPA call, one call per
row and layer): it is the CPU path, not the GPU one. The labels of each row's first token are ignored, so the
last token of one row is never trained to predict the next row.

It is used wherever it is exact: decoder-only architectures whose layers all attend to the full causal context
(`EXACT_MODEL_TYPES`, no sliding window) and code that ships with transformers (not `trust_remote_code`).
Elsewhere the rows of a micro-batch are padded to its longest, and `metrics.json` says why.

Sample packing (`train.lora_sample_packing`): rows are packed into sequences of up to `seq_tokens` tokens
(best-fit decreasing), and an optimizer step holds `effective_batch_size` such sequences instead of that many
rows, as TRL's and axolotl's packing count it. Rows never attend to each other inside a sequence; packing
changes which rows share a step, and so the number of optimizer steps, not what a row's loss is.
"""

from __future__ import annotations

import bisect
import functools
import logging
from collections.abc import Sequence
from typing import Any

from lora_pipeline.config import TrainConfig
from lora_pipeline.tokenization import IGNORE_INDEX
from lora_pipeline.training.encoded_data import tokens_in

log = logging.getLogger(__name__)

ATTENTION = "lora_pipeline_varlen"
# Architectures whose every layer is full causal attention over position ids that may restart: for these a
# row's logits do not depend on what shares its sequence. Sliding-window models (Mistral with a window, Gemma 2/3,
# Qwen2 with use_sliding_window) and models with custom code are not on the list.
EXACT_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi3", "granite", "olmo", "olmo2", "smollm3"}
)


def padding_free_support(config: Any, trust_remote_code: bool) -> tuple[bool, str]:
    """(exact, why not) for a model config: whether padding-free micro-batches give the padded batches' result."""
    if trust_remote_code:
        return False, "the model runs custom code (trust_remote_code), which may not honour restarting position ids"
    model_type = getattr(config, "model_type", "")
    if model_type not in EXACT_MODEL_TYPES:
        return False, f"not known to be exact for model type {model_type!r}"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return False, "the model uses sliding-window attention"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return False, "the model has layers that are not full attention"
    return True, ""


def enable_padding_free(model: Any) -> str:
    """Route the model's attention through `varlen_sdpa_attention` (flash-attention 2 is kept: it is varlen
    already). Returns the attention implementation in use."""
    from transformers import AttentionInterface, AttentionMaskInterface

    current = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if current.startswith("flash_attention"):
        return current
    if _flash_attention_usable(model):
        try:  # one varlen kernel per layer instead of one SDPA call per row
            model.set_attn_implementation("flash_attention_2")
            return "flash_attention_2"
        except (ImportError, ValueError) as exc:
            log.info("train: flash-attention 2 not used (%s); row-by-row SDPA instead", exc)
    AttentionInterface.register(ATTENTION, varlen_sdpa_attention)
    AttentionMaskInterface.register(ATTENTION, _padding_mask_only)
    model.set_attn_implementation(ATTENTION)
    return ATTENTION


def _flash_attention_usable(model: Any) -> bool:
    import importlib.util

    import torch

    dtype = next(model.parameters()).dtype
    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("flash_attn") is not None
        and dtype in (torch.float16, torch.bfloat16)
    )


def _padding_mask_only(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """The mask for `varlen_sdpa_attention`: none for a padding-free batch (the rows' bounds say it all, and a
    tokens x tokens mask would cost memory for nothing), SDPA's usual mask for padded batches (evaluation)."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def varlen_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal SDPA on each row's slice of a padding-free batch; plain SDPA for anything else.

    query: (1, heads, tokens, dim); key/value: (1, kv_heads, tokens, dim). Rows come from `cu_seq_lens_q`
    (set by `concat_rows`) or, failing that, from position ids that restart at 0.
    """
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = _varlen_kernel(query, attention_mask, dropout if module.training else 0.0, kwargs)
    out = _varlen_kernel_attention(kernel, query, key, value, scaling, kwargs) if kernel else None
    if out is not None:
        return out, None
    bounds = _row_bounds(kwargs, query.shape[0], attention_mask)
    if bounds is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    sizes = [e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    # split, not one slice per row: a slice's backward writes a zero-filled tensor of the whole sequence per row,
    # split's backward is one concatenation
    parts = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True)
    ]
    # (1, tokens, heads, dim), as transformers expects it back: one copy for the concatenation and the transpose
    return torch.cat([part.transpose(1, 2) for part in parts], dim=1), None


def _varlen_kernel(query: Any, attention_mask: Any, dropout: float, kwargs: dict[str, Any]) -> Any:
    """torch's own varlen flash-attention (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10), where it
    applies: a padding-free batch in half precision on CUDA, no attention dropout. One kernel per layer, and
    no host sync (row-by-row SDPA reads the row bounds back from the GPU in every layer)."""
    if not (
        query.is_cuda
        and query.shape[0] == 1
        and attention_mask is None
        and not dropout
        and kwargs.get("cu_seq_lens_q") is not None
        and isinstance(kwargs.get("max_length_q"), int)
    ):
        return None
    import torch

    if query.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_kernel_attention(kernel: Any, query: Any, key: Any, value: Any, scaling: Any, kwargs: dict) -> Any:
    """`kernel` (varlen_attn's contract: (tokens, heads, dim) tensors and cumulative row bounds) over a padding-
    free batch; returns (1, tokens, heads, dim) as transformers expects attention's output, or None where the
    kernel cannot take the model's attention scale."""
    import torch

    params = _parameters(kernel)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    options: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and "enable_gqa" in params:
        options["enable_gqa"] = True
    elif groups > 1:  # older torch: one kv head per query head (a copy; no sync)
        k, v = (t[:, :, None].expand(-1, -1, groups, -1).reshape(t.shape[0], -1, t.shape[2]) for t in (k, v))
    if "scale" in params:
        options["scale"] = scaling
    elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-9:
        return None
    cu = kwargs["cu_seq_lens_q"].to(device=q.device, dtype=torch.int32)
    longest = kwargs["max_length_q"]
    return kernel(q, k, v, cu, cu, longest, longest, **options).unsqueeze(0)


@functools.lru_cache(maxsize=4)
def _parameters(function: Any) -> frozenset[str]:
    """The argument names a function takes (read once: attention runs in every layer of every pass)."""
    import inspect

    return frozenset(inspect.signature(function).parameters)


def _row_bounds(kwargs: dict[str, Any], batch: int, attention_mask: Any) -> list[int] | None:
    if batch != 1 or attention_mask is not None:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    positions = kwargs.get("position_ids")
    if positions is None:
        return None
    starts = (positions[0] == 0).nonzero().flatten().tolist()
    if len(starts) <= 1:
        return None  # one row: plain causal SDPA
    return starts + [positions.shape[-1]]


def concat_rows(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One padding-free micro-batch: the rows (each possibly a packed sequence of several) end to end."""
    import torch

    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    for row in rows:
        start = 0
        for n in row.get("seq_lens") or [len(row["input_ids"])]:
            ids += row["input_ids"][start : start + n]
            labels += [IGNORE_INDEX] + row["labels"][start + 1 : start + n]  # never predict across rows
            positions += range(n)
            start += n
            bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([positions]),
        # flash-attention's varlen arguments, which transformers passes down to the attention layers
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
        "use_cache": False,  # with a cache transformers builds a full mask instead of honouring the row bounds
    }


def split_by_tokens(lengths: Sequence[int], max_tokens: int, max_rows: int = 0) -> list[list[int]]:
    """Positions of `lengths` in as few micro-batches of at most `max_tokens` real tokens as first-fit
    decreasing finds; nothing is padded, so fewer passes is all that counts. A row longer than the budget is a
    micro-batch of its own; `max_rows` (0 = no limit) caps rows per micro-batch."""
    batches: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free and not (max_rows and len(batches[b]) >= max_rows):
                batches[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            batches.append([i])
            room.append(max_tokens - lengths[i])
    return batches


def pack_rows(rows: Sequence[dict[str, Any]], seq_tokens: int) -> list[dict[str, Any]]:
    """Rows packed into sequences of at most `seq_tokens` tokens, best-fit decreasing (each row goes where it
    leaves the least room). A sequence keeps its rows' lengths in `seq_lens`; a row is never split."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted: the best fit is the first with enough room
    for i in order:
        n = len(rows[i]["input_ids"])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
            bisect.insort(free, (room - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (seq_tokens - n, len(bins) - 1))
    packed = []
    for members in bins:
        packed.append(
            {
                "input_ids": [t for i in members for t in rows[i]["input_ids"]],
                "labels": [t for i in members for t in rows[i]["labels"]],
                "seq_lens": [len(rows[i]["input_ids"]) for i in members],
            }
        )
    return packed


def choose_padding_free(model: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Padding-free micro-batches wherever they are exact for the model (see `packing`); why not elsewhere."""
    exact, why_not = padding_free_support(model.config, cfg.trust_remote_code)
    if not exact:
        log.info("train: micro-batches are padded: padding-free batches are %s", why_not)
        return {"applied": False, "reason": why_not}
    attention = enable_padding_free(model)
    if attention != ATTENTION:
        return {"applied": True, "attention": attention}
    kernel = _expected_kernel(model)
    import torch

    if torch.cuda.is_available() and kernel == "row-by-row SDPA":
        log.warning(
            "train: padding-free attention runs row by row on this GPU (one SDPA call per row and layer, slow): "
            "torch >= 2.10 or the flash-attn package gives one varlen kernel per layer"
        )
    return {"applied": True, "attention": attention, "kernel": kernel}


def _expected_kernel(model: Any) -> str:
    """Which way `varlen_sdpa_attention` will run for this model's training passes (for metrics.json)."""
    import importlib.util

    import torch

    half = getattr(model, "dtype", None) in (torch.float16, torch.bfloat16)
    if torch.cuda.is_available() and half and importlib.util.find_spec("torch.nn.attention.varlen"):
        return "torch varlen flash-attention, one call per layer"
    return "row-by-row SDPA"


def sample_packing(cfg: TrainConfig, rows: list[dict], padding_free: bool) -> tuple[dict[str, Any], list[dict]]:
    """With lora_sample_packing, the rows packed into sequences of up to min(max_seq_len, max_tokens_per_gpu)
    tokens, which then count as the samples of `effective_batch_size`; else the rows themselves."""
    if not cfg.lora_sample_packing:
        return {"requested": False, "applied": False}, rows
    if not padding_free:
        # Packing without row bounds in attention would let rows attend to each other: refuse to do that.
        reason = "rows can be packed only where padding-free batches are exact for the model (see padding_free)"
        log.warning("train.lora_sample_packing: not applied: %s", reason)
        return {"requested": True, "applied": False, "reason": reason}, rows
    seq_tokens = min(cfg.max_seq_len, cfg.max_tokens_per_gpu)
    packed = pack_rows(rows, seq_tokens)
    fill = tokens_in(rows) / (len(packed) * seq_tokens)
    log.info(
        "train.lora_sample_packing: %d rows packed into %d sequences of up to %d tokens (%.0f%% full)",
        len(rows),
        len(packed),
        seq_tokens,
        100 * fill,
    )
    info = {"requested": True, "applied": True, "sequence_tokens": seq_tokens, "sequences": len(packed)}
    return info | {"rows_per_sequence": round(len(rows) / len(packed), 2), "fill": round(fill, 4)}, packed
