"""What the train stage's phases hand on to each other (`Data`, `Model`, `Steps`, `Outcome`), and the run's
metrics.json built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig
from lora_pipeline.files import package_versions
from lora_pipeline.sources import MODEL_SCHEMES
from lora_pipeline.training.encoded_data import targets_in, tokens_in

# Packages whose versions metrics.json records.
VERSIONED = ("lora-pipeline", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")
MIN_STEPS = 10  # fewer optimizer steps than this and a LoRA barely leaves its init


@dataclass
class Data:
    """The tokenized rows, the key they are kept under, and the train rows' token counts (one epoch)."""

    train: list[dict]
    eval: list[dict]
    key: str
    tokens: int = field(init=False)
    targets: int = field(init=False)  # the tokens that carry the loss

    def __post_init__(self) -> None:
        self.tokens, self.targets = tokens_in(self.train), targets_in(self.train)


@dataclass
class Model:
    """The model being trained (LoRA-wrapped) and how it runs."""

    module: Any
    ref: str  # the base model's local path
    tokenizer: Any
    quant: dict[str, Any] | None
    backend: str
    padding_free: dict[str, Any]
    fused: int  # LoRA linears on the fused forward (see fused_lora)
    liger: bool


@dataclass
class Steps:
    """How the rows become optimizer steps, over how many processes, and where the checkpoints go."""

    rows: int  # rows per optimizer step, over all processes (each takes its share)
    items: list[dict]  # the rows, or packed sequences with sample packing
    packing: dict[str, Any]
    per_epoch: int
    total: int
    tokens_per_step: float
    pass_tokens: int  # the token budget of one forward + backward pass
    world: int
    rank: int
    cuda: bool
    work: Path  # checkpoints survive kill -9 and Ctrl-C, for resume
    resume: Path | None
    resumed_at: int
    notes: list[str]


@dataclass
class Outcome:
    """What the training run measured, for metrics.json."""

    seconds: float
    memory: dict[str, Any]
    checkpointing: dict[str, Any]
    batch_stats: dict[str, Any]
    eta: Any
    threads: dict[str, Any]
    stopped_early: bool


def run_metrics(
    cfg: TrainConfig, data: Data, model: Model, steps: Steps, trainer: Any, outcome: Outcome, best: Any
) -> dict[str, Any]:
    """metrics.json: the losses, the run's shape and settings, its speed and memory, the full log history."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return {
        "final_loss": losses[-1] if losses else None,
        # The mean of the logged losses, which a resumed run restores from its checkpoint; the Trainer's own
        # `training_loss` averages only the steps run by the last process. It includes the random-init start, so
        # it is always labelled "mean": the final loss is where training ended.
        "mean_loss": sum(losses) / len(losses) if losses else None,
        "eval_loss": best["eval_loss"] if best else evals[-1] if evals else None,
        "best": best,  # keep-best: the evaluation whose adapter was written
        "stopped_early": outcome.stopped_early,
        "steps": trainer.state.global_step,
        "resumed_from_step": steps.resumed_at or None,
        "epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps > 0 else None,
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "world_size": steps.world,
        # rows (packed sequences with sample packing) per optimizer step over all processes; each step is
        # cut into passes by the token budget ("batching": how many per step, all processes together)
        "effective_batch_size": steps.rows,
        "tokens": {"total": round(steps.tokens_per_step * steps.total), "target": targets_trained(data, steps)},
        "batching": {"max_tokens_per_pass": steps.pass_tokens, **outcome.batch_stats},
        "padding_free": model.padding_free,
        "gradient_checkpointing": outcome.checkpointing,
        # read back from the optimizer: what it applied to each parameter group
        "weight_decay": sorted({g["weight_decay"] for g in trainer.optimizer.param_groups}),
        "trackers": list(trainer.args.report_to),
        "fused_lora_layers": model.fused,  # LoRA linears on the fused forward (see fused_lora)
        "sample_packing": steps.packing,
        "threads": outcome.threads,
        "train_seconds": round(outcome.seconds, 3),
        "memory": outcome.memory,
        # predicted from the first steps (no evaluation in them) vs the seconds this run trained
        "time": {"estimate": outcome.eta.as_dict(), "train_seconds": round(outcome.seconds, 3)},
        # tokens trained (all processes), over the time outside the per-epoch evaluation
        "tokens_per_second": tokens_per_second(history, steps, trainer.state.global_step, outcome.seconds),
        "backend": model.backend,
        "merged": cfg.merge,
        "liger": model.liger,
        "quantization": model.quant,
        "trust_remote_code": cfg.trust_remote_code,
        "device": "cuda" if steps.cuda else "cpu",
        "trainable_parameters": sum(p.numel() for p in model.module.parameters() if p.requires_grad),
        "base_model": model.ref,
        "base_model_uri": cfg.model if cfg.model.startswith(MODEL_SCHEMES) else None,  # eval refetches it
        "warnings": steps.notes,
        "versions": package_versions(VERSIONED),
        "history": history,
    }


def targets_trained(data: Data, steps: Steps) -> int:
    """Target tokens over the run: an epoch's, scaled to the run's steps (max_steps may end it mid-epoch)."""
    return round(data.targets * steps.total / steps.per_epoch)


def tokens_per_second(history: list[dict], steps: Steps, global_step: int, seconds: float) -> float:
    """Tokens trained by all processes since this run started (a resumed run counts from its checkpoint), per
    second of training outside evaluation."""
    tokens_here = round(steps.tokens_per_step * steps.total) * (global_step - steps.resumed_at) / steps.total
    evaluating = sum(h["eval_runtime"] for h in history if "eval_runtime" in h and h.get("step", 0) > steps.resumed_at)
    return round(tokens_here / max(1e-9, seconds - evaluating), 1)


def loss_summary(final: float | None, mean: float | None) -> str:
    """`final loss 0.5123 (mean over the run 1.3754)`: the summary line leads with where training ended."""
    if final is None:
        return "no loss logged"
    return f"final loss {final:.4f}" + (f" (mean over the run {mean:.4f})" if mean is not None else "")


def small_dataset_warnings(rows: int, batch: int, epochs: int, steps_per_epoch: int, steps: int) -> list[str]:
    """Too few optimizer steps leave the adapter near its zero init: the warning, with the numbers (metrics.json
    keeps it)."""
    if steps >= MIN_STEPS or steps < steps_per_epoch * epochs:  # fewer by max_steps: the user's choice
        return []
    return [
        f"only {steps} optimizer step{'s' if steps != 1 else ''} ({rows} rows, effective_batch_size {batch}, "
        f"{epochs} epoch{'s' if epochs != 1 else ''}): training will barely move the adapter; "
        "lower --train.effective_batch_size or add epochs"
    ]
