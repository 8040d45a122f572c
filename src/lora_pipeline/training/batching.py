"""Token-budget batching: optimizer steps of `effective_batch_size` rows, cut into micro-batches by tokens.

Each optimizer step holds a fixed number of rows, the effective batch (the last step of an epoch holds what is
left when the rows do not divide evenly); with several processes, each takes every world-th row of every step
(`StepSampler`), so together they train the step one process would. A process's rows are sorted by length and
cut into micro-batches that each hold at most `max_tokens` tokens counting padding (rows x the longest row in
the micro-batch), where padding plus a per-pass overhead is least (`split_by_budget`). So the number of
micro-batches varies from step to step: a step of short rows may be one forward pass, a step of long rows
several, and they need not be equal (e.g. 1 row of 900 tokens, then 15 rows of 400..600).

None of that changes the step's result, only its speed: the step's loss is the mean over all its real
target tokens (not a mean of per-micro-batch means). Each micro-batch's summed token loss is divided by the
step's target-token count, summed over all processes (each holds only its share of the step's rows), so the
micro-batches' gradients, all-reduced over the processes, add up to the gradient of the whole step taken at
once. The learning-rate schedule counts optimizer steps, so it does not see the split either.

With padded passes, rows of similar length share a step, so little is padded: the epoch's rows are shuffled, cut
into mega-batches of `MEGA_STEPS` steps, each mega-batch is sorted by length and cut into steps, and the steps
are shuffled. Padding-free passes pad nothing, so there a step's rows are simply the next ones of the shuffled
epoch (mega-batches of one step): grouping by length would only skew how many tokens each step weighs.
Everything is drawn from `random.Random` seeded by (seed, epoch) alone, never from the torch RNG, so a run
resumed from a checkpoint sees the same steps in the same order and the Trainer's skip of the steps already
trained lands on the right ones.

The Trainer sees one batch per optimizer step (gradient_accumulation_steps 1): `trainer.TokenBudgetTrainer`
runs the step's micro-batches itself in `training_step`, each normalised by the step's target-token count
through transformers' `num_items_in_batch` (the model divides its summed token loss by it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any

from lora_pipeline.tokenization import IGNORE_INDEX, PadCollator
from lora_pipeline.training.packing import concat_rows, split_by_tokens

# What one more forward + backward pass costs beyond its tokens, in tokens: the price of cutting a step finer.
PASS_OVERHEAD_TOKENS = 256
MEGA_STEPS = 64  # steps sorted together: more means less padding, less randomness in which rows share a step


def split_by_budget(
    lengths: Sequence[int], max_tokens: int, max_rows: int = 0, overhead: int = PASS_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Positions of `lengths` cut into micro-batches, longest first, each within `max_tokens` counting padding.

    The rows are sorted by length and cut where the cost is least: padded tokens plus `overhead` tokens per
    forward pass. Filling the budget greedily would pad a 100-token row to 900 whenever both fit; cutting
    everywhere would run many tiny passes. The best cut is found exactly (dynamic programming over the sorted
    rows; cheap, a step holds at most a few hundred rows). A row longer than `max_tokens` on its own is a
    micro-batch of one (truncation is max_seq_len's job). `max_rows` (0 = no limit) caps rows per micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    width = [lengths[i] for i in order]
    n = len(order)
    best = [0] + [math.inf] * n  # best[j]: least cost of the first j sorted rows
    cut = [0] * (n + 1)  # where the last micro-batch of that best split starts
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # micro-batch i..j-1, padded to width[i]; widening as i goes down
            rows = j - i
            if rows > 1 and (rows * width[i] > max_tokens or (max_rows and rows > max_rows)):
                break
            cost = best[i] + rows * width[i] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j] : j])
        j = cut[j]
    return batches[::-1]


class StepSampler:
    """Batch sampler for the Trainer: yields the row indices of one optimizer step at a time.

    Deterministic from `seed` and the epoch set by `set_epoch` (the Trainer calls it before each epoch).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        step_rows: int,
        seed: int,
        mega_steps: int = MEGA_STEPS,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.lengths = list(lengths)
        self.step_rows = max(1, step_rows)
        self.seed = seed
        self.mega_steps = max(1, mega_steps)
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.steps(self.epoch))

    def steps(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")  # a str seed hashes the same in every process (no PYTHONHASHSEED)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        mega = self.step_rows * self.mega_steps
        steps: list[list[int]] = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            steps += [chunk[i : i + self.step_rows] for i in range(0, len(chunk), self.step_rows)]
        # The last step may be short (rows not divisible by the step): it stays a step, wherever it lands, unless
        # it has fewer rows than there are processes (each needs one): then it joins the step before.
        if len(steps) > 1 and len(steps[-1]) < self.world:
            last = steps.pop()
            steps[-1] = steps[-1] + last
        rng.shuffle(steps)
        return steps

    def __iter__(self) -> Iterator[list[int]]:
        # Every process walks the same global steps and takes every world-th row of each (rows of a step are
        # sorted by length, so the shares are about even): together they train the step a single process would.
        for step in self.steps(self.epoch):
            yield step[self.rank :: self.world]


class StepCollator:
    """Collates one optimizer step's rows into micro-batches within the token budget: padding-free (rows end to
    end, see `packing`) when `padding_free`, else padded to each micro-batch's longest row.

    `targets_only` (padding-free only): the micro-batch also says which positions predict a target token, and
    the trainer computes the output layer's logits at those positions only. The prompt's positions need no
    logits; with a large vocabulary (150k for Qwen) the logits are a large share of the time and memory.
    """

    def __init__(
        self,
        pad_token_id: int,
        max_tokens: int,
        max_rows: int = 0,
        padding_free: bool = False,
        targets_only: bool = False,
    ) -> None:
        self.pad = PadCollator(pad_token_id)
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self.padding_free = padding_free
        self.targets_only = targets_only and padding_free

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        lengths = [len(r["input_ids"]) for r in rows]
        if self.padding_free:
            parts = split_by_tokens(lengths, self.max_tokens, self.max_rows)
            batches = [concat_rows([rows[i] for i in part]) for part in parts]
            if self.targets_only:
                for mb in batches:  # position p predicts token p + 1
                    mb["target_positions"] = (mb["labels"][0, 1:] != IGNORE_INDEX).nonzero().flatten()
            return {"micro_batches": batches}
        parts = split_by_budget(lengths, self.max_tokens, self.max_rows)
        return {"micro_batches": [self.pad([rows[i] for i in part]) for part in parts]}


def target_tokens(batch: dict[str, Any]) -> int:
    """Target tokens the causal-LM loss counts in a padded batch: labels shifted by one, padding excluded."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def summed_token_loss(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> Any:
    """Causal-LM cross-entropy summed over target tokens, divided by `num_items_in_batch` (the step's count)."""
    import torch.nn.functional as F

    logits = outputs["logits"][..., :-1, :].float()
    targets = labels[..., 1:].to(logits.device)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / (num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum())


class BatchStats:
    """Real and padded tokens of the micro-batches trained, and micro-batches per optimizer step."""

    def __init__(self) -> None:
        self.real = self.padded = self.micro_batches = self.steps = 0
        self.max_micro_batches = 0

    def add_step(self, micro_batches: list[dict[str, Any]]) -> None:
        self.steps += 1
        self.micro_batches += len(micro_batches)
        self.max_micro_batches = max(self.max_micro_batches, len(micro_batches))
        for mb in micro_batches:
            mask = mb.get("attention_mask")  # none in a padding-free micro-batch: every token is real
            self.real += int(mask.sum()) if mask is not None else mb["input_ids"].numel()
            self.padded += mb["input_ids"].numel()

    def counts(self) -> list[int]:
        return [self.real, self.padded, self.micro_batches]

    def as_dict(self, counts: list[int] | None = None) -> dict[str, Any]:
        """The statistics; `counts` (from `counts()`, summed over processes) replaces this process's own."""
        real, padded, micro_batches = counts or self.counts()
        return {
            "real_tokens": real,
            "padded_tokens": padded,  # real tokens plus padding: what the forward passes computed on
            "padding_share": round(1 - real / padded, 4) if padded else 0.0,
            "micro_batches_per_step": round(micro_batches / self.steps, 2) if self.steps else 0.0,
            "max_micro_batches_per_step": self.max_micro_batches,
        }
