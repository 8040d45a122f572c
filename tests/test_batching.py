"""Token-budget batching: the budget holds, steps are deterministic, and splitting a step changes no number."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

from lora_pipeline.tokenization import IGNORE_INDEX, PadCollator
from lora_pipeline.training.batching import (
    StepCollator,
    StepSampler,
    split_by_budget,
    target_tokens,
)


def log_uniform_lengths(n: int, seed: int = 0, low: int = 16, high: int = 1024) -> list[int]:
    rng = random.Random(seed)
    return [int(round(low * (high / low) ** rng.random())) for _ in range(n)]


def rows_of(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, 200) for _ in range(n)]
        cut = n // 3  # a prompt without targets, then the answer
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


@pytest.mark.parametrize("budget", [1024, 3000, 32000])
def test_no_micro_batch_exceeds_the_token_budget_counting_padding(budget: int) -> None:
    lengths = log_uniform_lengths(500)
    sampler = StepSampler(lengths, step_rows=32, seed=1)
    collate = StepCollator(pad_token_id=0, max_tokens=budget)
    rows = rows_of(lengths)
    seen = []
    for step in sampler:
        micro_batches = collate([rows[i] for i in step])["micro_batches"]
        assert sum(mb["input_ids"].shape[0] for mb in micro_batches) == len(step)  # every row of the step, once
        for mb in micro_batches:
            assert mb["input_ids"].numel() <= budget
        seen += step
    assert sorted(seen) == list(range(500))  # an epoch is every row once


def test_a_row_longer_than_the_budget_is_a_micro_batch_of_its_own() -> None:
    assert split_by_budget([10, 50, 20], max_tokens=40) == [[1], [2, 0]]
    assert split_by_budget([10, 10, 10, 10], max_tokens=1000, max_rows=3) == [[0, 1, 2], [3]]


def test_steps_are_a_function_of_seed_and_epoch_only() -> None:
    lengths = log_uniform_lengths(300)
    a, b = StepSampler(lengths, 16, seed=7), StepSampler(lengths, 16, seed=7)
    b.set_epoch(1)
    b.set_epoch(0)  # a resumed run sets the epoch again: same steps as a fresh sampler
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert list(StepSampler(lengths, 16, seed=8)) != list(b)
    assert len(a) == len(list(a)) == 19  # ceil(300 / 16): the last step holds the remaining 12 rows


def test_length_grouping_keeps_padding_small_with_few_forward_passes() -> None:
    lengths = log_uniform_lengths(2048)
    rows = rows_of(lengths)
    collate = StepCollator(pad_token_id=0, max_tokens=8192)

    def padding_and_passes(steps: list[list[int]]) -> tuple[float, int]:
        real = padded = passes = 0
        for step in steps:
            for mb in collate([rows[i] for i in step])["micro_batches"]:
                real, padded = real + int(mb["attention_mask"].sum()), padded + mb["input_ids"].numel()
                passes += 1
        return 1 - real / padded, passes

    order = list(range(len(lengths)))
    random.Random(0).shuffle(order)
    unsorted = padding_and_passes([order[i : i + 32] for i in range(0, len(order), 32)])
    grouped = padding_and_passes(list(StepSampler(lengths, 32, seed=0)))
    assert grouped[0] < 0.05 and grouped[0] < unsorted[0] and grouped[1] < unsorted[1]


def test_cuts_weigh_padding_against_the_cost_of_a_pass() -> None:
    # Filling the budget would pad the 100-token row to 900: two passes cost less.
    assert split_by_budget([100, 900], max_tokens=10_000, overhead=256) == [[1], [0]]
    assert split_by_budget([30, 20], max_tokens=10_000, overhead=256) == [[0, 1]]  # padding 10 < one more pass


@pytest.fixture(scope="module")
def lora_model(demo_assets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    # Random A and B (not PEFT's zero B), so every LoRA weight has a gradient to compare.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers for a deprecated attribute: not this test's concern
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(base, lora)


def budget_trainer(model, rows: list[dict], max_tokens: int, tmp_path: Path):
    import transformers

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True)
    from lora_pipeline.training.trainer import TokenBudgetTrainer

    return TokenBudgetTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=PadCollator(0),
        step_sampler=StepSampler([len(r["input_ids"]) for r in rows], len(rows), seed=0),
        step_collator=StepCollator(0, max_tokens),
    )


def step_loss_and_grads(model, rows: list[dict], max_tokens: int, tmp_path: Path) -> tuple[float, dict, int]:
    """One optimizer step's loss and gradients through TokenBudgetTrainer.training_step, and its micro-batches."""
    trainer = budget_trainer(model, rows, max_tokens, tmp_path)
    # PEFT-wrapped Qwen2 takes `num_items_in_batch`: the model itself divides its summed token loss by it.
    assert trainer.model_accepts_loss_kwargs and trainer.compute_loss_func is None
    model.zero_grad()
    batch = StepCollator(0, max_tokens)(rows)
    loss = trainer.training_step(model, batch).item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss, grads, len(batch["micro_batches"])


@pytest.mark.integration
def test_a_steps_flops_are_the_trainers_estimate_with_the_parameters_counted_once(
    lora_model, tmp_path: Path, monkeypatch
) -> None:
    import transformers

    rows = rows_of([40, 37, 33, 30, 12, 11, 9, 8], seed=3)
    trainer = budget_trainer(lora_model, rows, 80, tmp_path)
    batch = StepCollator(0, 80)(rows)
    expected = sum(transformers.Trainer.floating_point_ops(trainer, mb) for mb in batch["micro_batches"])
    assert len(batch["micro_batches"]) == 3 and expected > 0
    counted = []
    count = lora_model.num_parameters
    monkeypatch.setattr(lora_model, "num_parameters", lambda **kw: counted.append(kw) or count(**kw))
    assert [trainer.floating_point_ops(batch) for _ in range(3)] == [expected] * 3
    assert len(counted) == 1  # not a walk over every module in every step


@pytest.mark.integration
def test_one_micro_batch_and_several_give_the_same_loss_and_gradients(lora_model, tmp_path: Path) -> None:
    lengths = [40, 37, 33, 30, 12, 11, 9, 8]
    rows = rows_of(lengths, seed=3)
    whole_loss, whole_grads, n_whole = step_loss_and_grads(lora_model, rows, 10_000, tmp_path)
    split_loss, split_grads, n_split = step_loss_and_grads(lora_model, rows, 80, tmp_path)
    assert (n_whole, n_split) == (1, 3)  # within 80 tokens: 40+37 | 33+30 | 12+11+9+8 (4 rows of width 12)
    # The reference: the mean cross-entropy over every target token of the step, computed in one piece.
    padded = PadCollator(0)(rows)
    logits = lora_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        padded["labels"][:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    assert abs(whole_loss - reference.item()) < 1e-5
    assert abs(split_loss - whole_loss) < 1e-5
    assert whole_grads.keys() == split_grads.keys() and len(whole_grads) > 0
    for name, grad in whole_grads.items():
        assert torch.allclose(grad, split_grads[name], atol=1e-5, rtol=1e-4), name
    assert target_tokens(padded) == sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    # A mean of per-micro-batch means would weigh the short rows' few tokens as much as the long rows' many:
    # it differs, so the equalities above do test the normalisation.
    with torch.no_grad():
        means = [lora_model(**mb).loss.item() for mb in StepCollator(0, 80)(rows)["micro_batches"]]
    assert abs(sum(means) / len(means) - whole_loss) > 1e-3
