"""Padding-free micro-batches and sample packing: the same per-row losses as padded batches, no padding."""

from __future__ import annotations

import functools
import random

import pytest
import torch
import transformers

from helpers import train_config
from lora_pipeline.files import read_json
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.tokenization import IGNORE_INDEX, PadCollator
from lora_pipeline.training import batching, packing
from lora_pipeline.training.packing import (
    concat_rows,
    enable_padding_free,
    pack_rows,
    padding_free_support,
    split_by_tokens,
)


def random_rows(n: int, seed: int, lo: int = 3, hi: int = 60, vocab: int = 700) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        ids = [rng.randrange(5, vocab) for _ in range(length)]
        prompt = rng.randint(1, length - 1)  # loss on the answer only, as for chat rows
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def per_row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each row of a padded batch."""
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(1) / (labels[:, 1:] != IGNORE_INDEX).sum(1)


def packed_row_losses(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    labels = batch["labels"][0]
    token_loss = torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    bounds = batch["cu_seq_lens_q"].tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # token t of the row is predicted at position t - 1; the row's first token is never a target
        targets = labels[start + 1 : end] != IGNORE_INDEX
        out.append(token_loss[start : end - 1][targets].sum() / targets.sum())
    return torch.stack(out)


@pytest.fixture(scope="module")
def demo_model(demo_assets):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)


@pytest.mark.integration
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_get_the_losses_and_logits_they_get_alone(demo_model, attention) -> None:
    demo_model.set_attn_implementation(attention)
    rows = random_rows(7, seed=1)
    with torch.no_grad():
        padded = PadCollator(0)(rows)
        reference = per_row_losses(demo_model(**padded).logits, padded["labels"])
        batch = concat_rows(rows)
        # transformers' own path: restarting position ids, no mask (a tokens x tokens block mask is built)
        plain = packed_row_losses(demo_model(**batch).logits, batch)
        enable_padding_free(demo_model)  # row-by-row attention, no mask at all
        varlen_logits = demo_model(**batch).logits
        varlen = packed_row_losses(varlen_logits, batch)
        alone = demo_model(input_ids=torch.tensor([rows[3]["input_ids"]])).logits[0]
    assert torch.allclose(plain, reference, atol=1e-4), (plain, reference)
    assert torch.allclose(varlen, reference, atol=1e-4), (varlen, reference)
    start = batch["cu_seq_lens_q"][3]
    assert torch.allclose(varlen_logits[0, start : start + len(rows[3]["input_ids"])], alone, atol=1e-4)
    # without the row bounds the rows would attend to each other: the losses differ, so the test can fail
    with torch.no_grad():
        crossed = demo_model(input_ids=batch["input_ids"], use_cache=False).logits
    assert not torch.allclose(packed_row_losses(crossed, batch), reference, atol=1e-4)


def reference_varlen_attn(
    q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """torch.nn.attention.varlen.varlen_attn's contract (torch > 2.10), computed row by row on the CPU."""
    assert window_size == (-1, 0) and torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k
    bounds = cu_seq_q.tolist()
    assert max_q == max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    rows = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, tokens, dim)
        attended = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa
        )
        rows.append(attended.transpose(0, 1))
    return torch.cat(rows)


def torch_2_10_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False):
    """torch 2.10's older signature: no window, GQA or scale arguments (kv heads must match query heads)."""
    assert is_causal and q.shape[1] == k.shape[1]
    return reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.integration
@pytest.mark.parametrize("kernel", [reference_varlen_attn, torch_2_10_varlen_attn])
def test_varlen_kernel_path_gives_the_padded_losses(demo_model, kernel, monkeypatch) -> None:
    """On CUDA a padding-free batch goes through torch's varlen flash-attention, one call per layer. Here a CPU
    stand-in with that kernel's contract checks the layout, GQA and causality around it."""
    calls = []

    @functools.wraps(kernel)  # the path reads the kernel's signature to know which arguments it takes
    def counting(*args, **kwargs):
        calls.append(args[3].tolist())
        return kernel(*args, **kwargs)

    def on_padding_free_batches(query, attention_mask, dropout, kwargs):
        return counting if attention_mask is None and kwargs.get("cu_seq_lens_q") is not None else None

    monkeypatch.setattr(packing, "_varlen_kernel", on_padding_free_batches)
    demo_model.set_attn_implementation("sdpa")
    rows = random_rows(7, seed=3)
    with torch.no_grad():
        padded = PadCollator(0)(rows)
        reference = per_row_losses(demo_model(**padded).logits, padded["labels"])
        enable_padding_free(demo_model)
        batch = concat_rows(rows)
        through_kernel = packed_row_losses(demo_model(**batch).logits, batch)
    assert len(calls) == demo_model.config.num_hidden_layers and calls[0] == batch["cu_seq_lens_q"].tolist()
    assert demo_model.config.num_key_value_heads < demo_model.config.num_attention_heads  # GQA is exercised
    assert torch.allclose(through_kernel, reference, atol=1e-4), (through_kernel, reference)


def test_metrics_name_the_attention_kernel_that_will_run(monkeypatch) -> None:
    from types import SimpleNamespace

    bf16 = SimpleNamespace(dtype=torch.bfloat16)
    assert packing._expected_kernel(bf16) == "row-by-row SDPA"  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert packing._expected_kernel(bf16) == "torch varlen flash-attention, one call per layer"
    assert packing._expected_kernel(SimpleNamespace(dtype=torch.float32)) == "row-by-row SDPA"


def test_row_by_row_attention_on_a_gpu_is_named_as_slow(demo_assets, monkeypatch, caplog) -> None:
    from lora_pipeline.config import TrainConfig

    model = transformers.AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        on_cpu = packing.choose_padding_free(model, TrainConfig())
        assert on_cpu["kernel"] == "row-by-row SDPA" and not caplog.records  # the CPU path: nothing to say
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU where no varlen kernel applies
        on_gpu = packing.choose_padding_free(model, TrainConfig())
    assert on_gpu["kernel"] == "row-by-row SDPA"
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("train: padding-free attention runs row by row on this GPU") and "2.10" in warning


@pytest.mark.integration
def test_padding_free_gradients_match_padded(demo_assets) -> None:
    from peft import LoraConfig, get_peft_model

    def grads(padding_free: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        base = transformers.AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
        if padding_free:
            enable_padding_free(base)
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        rows = random_rows(6, seed=2)
        batch = concat_rows(rows) if padding_free else PadCollator(0)(rows)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    padded, free = grads(False), grads(True)
    assert padded.keys() == free.keys() and padded
    for name in padded:
        assert torch.allclose(padded[name], free[name], atol=1e-5), name


def test_split_by_tokens_respects_the_budget_and_keeps_every_row() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)] + [900]
    parts = split_by_tokens(lengths, 512, max_rows=12)
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    for part in parts:
        assert sum(lengths[i] for i in part) <= 512 or len(part) == 1  # an over-long row goes alone
        assert len(part) <= 12
    assert len(parts) <= 1.1 * sum(lengths) / 512 + 2  # first-fit decreasing: close to the least possible


def test_pack_rows_fills_sequences_without_splitting_rows() -> None:
    rows = random_rows(300, seed=3, lo=3, hi=200)
    packed = pack_rows(rows, 256)
    assert all(len(p["input_ids"]) <= 256 for p in packed)
    assert sum(len(p["seq_lens"]) for p in packed) == len(rows)
    assert sorted(tuple(r["input_ids"]) for r in rows) == sorted(
        tuple(p["input_ids"][s - n : s])
        for p in packed
        for n, s in zip(p["seq_lens"], __import__("itertools").accumulate(p["seq_lens"]), strict=True)
    )
    fill = sum(len(r["input_ids"]) for r in rows) / (256 * len(packed))
    assert fill > 0.95
    # the packed sequence's rows stay apart: each restarts its positions and its first label is ignored
    batch = concat_rows(packed[:2])
    assert int((batch["position_ids"][0] == 0).sum()) == sum(len(p["seq_lens"]) for p in packed[:2])
    starts = batch["cu_seq_lens_q"][:-1].long()
    assert bool((batch["labels"][0, starts] == IGNORE_INDEX).all())


def test_support_is_limited_to_exact_cases(demo_model) -> None:
    assert padding_free_support(demo_model.config, trust_remote_code=False) == (True, "")
    assert not padding_free_support(demo_model.config, trust_remote_code=True)[0]
    sliding = transformers.Qwen2Config(use_sliding_window=True, sliding_window=64, num_hidden_layers=2)
    assert not padding_free_support(sliding, False)[0]
    assert not padding_free_support(transformers.GPT2Config(), False)[0]


# ---- through the train stage ----


@pytest.mark.integration
def test_training_padding_free_matches_padded_step_by_step(demo_assets, demo_dataset, tmp_path, monkeypatch) -> None:
    free = read_json(
        train_adapter(train_config(demo_assets.model_dir), demo_dataset, tmp_path / "free") / "metrics.json"
    )
    monkeypatch.setattr(packing, "padding_free_support", lambda config, trc: (False, "switched off by the test"))
    monkeypatch.setattr(batching, "MEGA_STEPS", 1)  # the steps padding-free training takes: the same rows per step
    padded = read_json(
        train_adapter(train_config(demo_assets.model_dir), demo_dataset, tmp_path / "pad") / "metrics.json"
    )
    assert free["padding_free"] == {"applied": True, "attention": packing.ATTENTION, "kernel": "row-by-row SDPA"}
    assert padded["padding_free"] == {"applied": False, "reason": "switched off by the test"}
    assert free["batching"]["padding_share"] == 0.0 < padded["batching"]["padding_share"]
    assert free["batching"]["real_tokens"] == padded["batching"]["real_tokens"]
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (free, padded)]
    assert len(losses[0]) == 9 and losses[0] == pytest.approx(losses[1], abs=1e-4)
    assert free["eval_loss"] == pytest.approx(padded["eval_loss"], abs=1e-4)


@pytest.mark.integration
def test_sample_packing_counts_packed_sequences_as_samples(demo_assets, demo_dataset, tmp_path, caplog) -> None:
    cfg = train_config(demo_assets.model_dir, lora_sample_packing=True, effective_batch_size=2, max_tokens_per_gpu=256)
    with caplog.at_level("INFO", logger="lora_pipeline"):
        metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "t") / "metrics.json")
    info = metrics["sample_packing"]
    assert info["applied"] and info["sequence_tokens"] == 128  # min(max_seq_len, max_tokens_per_gpu)
    assert info["rows_per_sequence"] > 1.5 and info["fill"] > 0.8
    assert metrics["steps"] == -(-info["sequences"] // 2) < 72 // 2  # fewer steps than rows / 2
    assert metrics["batching"]["real_tokens"] == metrics["tokens"]["total"]  # every row trained once
    assert any("packed into" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_sample_packing_is_refused_where_rows_would_see_each_other(
    demo_assets, demo_dataset, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(packing, "padding_free_support", lambda config, trc: (False, "not exact here"))
    cfg = train_config(demo_assets.model_dir, lora_sample_packing=True)
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "t") / "metrics.json")
    assert metrics["sample_packing"]["requested"] and not metrics["sample_packing"]["applied"]
    assert metrics["steps"] == 9
    assert [r for r in caplog.records if "lora_sample_packing: not applied" in r.getMessage()]
