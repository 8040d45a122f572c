"""`TokenBudgetTrainer`: transformers' Trainer taking one batch per optimizer step and running the step's
micro-batches itself, each normalised by the step's target-token count over all processes (see `batching`).

It also defines the eval loss as the training loss is defined (the mean over every target token), stops at the
first step whose loss is not finite, and counts the step's floating-point operations cheaply.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
import transformers
from torch.utils.data import DataLoader

from lora_pipeline.errors import StageError
from lora_pipeline.training.batching import BatchStats, StepCollator, StepSampler, summed_token_loss, target_tokens


class StepLoader(DataLoader):
    def set_epoch(self, epoch: int) -> None:  # the Trainer calls it before each epoch
        self.batch_sampler.set_epoch(epoch)


class TokenBudgetTrainer(transformers.Trainer):
    """A Trainer whose batches are whole optimizer steps (see `batching`'s module docstring)."""

    def __init__(self, *args: Any, step_sampler: StepSampler, step_collator: StepCollator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_sampler, self.step_collator = step_sampler, step_collator
        self.batch_stats = BatchStats()
        self._flop_parameters: int | None = None
        if not self.model_accepts_loss_kwargs and self.compute_loss_func is None:
            # The model would return a per-micro-batch mean: compute the summed token loss here instead.
            self.compute_loss_func = summed_token_loss

    def get_train_dataloader(self) -> DataLoader:
        # Not handed to accelerate, which would give each process whole steps of its own: the sampler gives
        # each its share of every step. The Trainer moves the tensors to the device.
        return StepLoader(
            self.train_dataset, batch_sampler=self.step_sampler, collate_fn=self.step_collator, num_workers=0
        )

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        micro_batches = inputs["micro_batches"]
        self.batch_stats.add_step(micro_batches)
        # Every target token of the step, over all processes: each micro-batch's summed token loss is divided
        # by it, so the micro-batches' losses and gradients add up to the step's token mean.
        total = torch.tensor(sum(target_tokens(mb) for mb in micro_batches), device=self.args.device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        total = total.clamp(min=1)
        loss = torch.zeros((), device=self.args.device)
        for i, mb in enumerate(micro_batches):
            # Gradients are reduced across processes once, after the step's last micro-batch.
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                loss = loss + super().training_step(model, mb, total)
        self._stop_if_not_finite(loss)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """A nan/inf loss poisons the weights for every later step, and the run would end "successfully"
        with a useless adapter: stop at the step it appears. All processes see the same verdict."""
        finite = torch.isfinite(loss.detach()).to(torch.int32)
        if self.args.world_size > 1:
            finite = self.accelerator.gather(finite.reshape(1)).min()
        if not bool(finite):
            raise StageError(
                f"the training loss is {float(loss):g} at step {self.state.global_step + 1}: training diverged; "
                f"lower --train.learning_rate (now {self.args.learning_rate:g}) or check the base model's weights",
                field="train",
            )

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        positions = inputs.get("target_positions")
        if positions is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Logits at the positions that predict a target token only (see StepCollator's targets_only).
        targets = inputs["labels"][0, positions + 1]
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "target_positions")}
        outputs = model(**inputs, logits_to_keep=positions)
        loss = torch.nn.functional.cross_entropy(outputs.logits[0].float(), targets, reduction="sum")
        loss = loss / (num_items_in_batch if num_items_in_batch is not None else max(1, len(targets)))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the Trainer's compute_loss does: DDP averages
        return (loss, outputs) if return_outputs else loss

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The eval loss as the training loss is defined: the mean over every target token of the eval rows.
        The Trainer's own averages per-batch means, which moves with the batching and with how the rows are
        split among processes; this is the same number however they are batched or split."""
        rows = self.eval_dataset if eval_dataset is None else eval_dataset
        started = time.perf_counter()
        model = self.model
        was_training = model.training
        model.eval()
        rank, world = self.args.process_index, self.args.world_size
        mine = sorted(range(rank, len(rows), world), key=lambda i: len(rows[i]["input_ids"]))
        size = self.args.per_device_eval_batch_size
        totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        with torch.no_grad():
            for start in range(0, len(mine), size):
                batch = self._prepare_inputs(self.data_collator([rows[i] for i in mine[start : start + size]]))
                outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
                totals[0] += summed_token_loss(outputs, batch["labels"], num_items_in_batch=1).double()
                totals[1] += target_tokens(batch)
        if world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        model.train(was_training)
        eval_loss = float(totals[0] / totals[1].clamp(min=1))
        if not math.isfinite(eval_loss):
            raise StageError(
                f"the eval loss is {eval_loss:g} at step {self.state.global_step}: the model's outputs are not "
                "finite; lower --train.learning_rate or check the base model's weights",
                field="train",
            )
        metrics = {
            f"{metric_key_prefix}_loss": eval_loss,
            f"{metric_key_prefix}_runtime": round(time.perf_counter() - started, 4),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """The Trainer's estimate (6 x tokens x non-embedding parameters), summed over the step's micro-batches.
        The Trainer's own counts the parameters by walking every module of the model, on every step (1.5 ms of
        a 29 ms demo step); they are counted once here."""
        main = getattr(self.model, "main_input_name", "input_ids")
        if self._flop_parameters is None:
            counts = hasattr(self.model, "num_parameters")
            self._flop_parameters = self.model.num_parameters(exclude_embeddings=True) if counts else 0
        batches = inputs.get("micro_batches") or [inputs]
        return sum(6 * mb[main].numel() * self._flop_parameters for mb in batches if main in mb)
