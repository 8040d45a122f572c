"""The train stage's run-shaping knobs: experiment trackers, max_steps, weight decay, evaluation every N steps,
gradient checkpointing, keep-best and early stopping, mapped onto transformers' Trainer; `training_arguments`
is the whole mapping of a TrainConfig onto transformers' TrainingArguments.

Keep-best and early stopping are decided from the Trainer's `log_history` (restored from a checkpoint on
resume), not from callback state: a resumed run sees every evaluation made before its checkpoint. The best
evaluation's adapter weights are kept aside in the work directory (`best_adapter.safetensors`, tagged with its
step), out of the Trainer's checkpoint rotation, and loaded back before the adapter is written.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig
from lora_pipeline.errors import ConfigError, StageError

log = logging.getLogger(__name__)

# tracker -> (a module transformers' integration imports, the package to install)
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboardX"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
}
BEST_FILE = "best_adapter.safetensors"
# Gradient checkpointing recomputes each layer's forward in the backward (about a third more compute): auto turns
# it on only where activations are a large share of the peak, so dropping them is worth the time.
CHECKPOINTING_SHARE = 1 / 3


def trackers(cfg: TrainConfig) -> list[str]:
    """`train.report_to` checked: known names, and each one's package importable; [] for none."""
    names = [n.strip().lower() for item in cfg.report_to for n in str(item).split(",") if n.strip()]
    unknown = [n for n in names if n != "none" and n not in TRACKERS]
    if unknown:
        raise ConfigError(f"unknown tracker {unknown[0]!r}: use {', '.join(TRACKERS)} or none", field="train.report_to")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError("none with other trackers: name the trackers, or none alone", field="train.report_to")
    chosen = [n for n in dict.fromkeys(names) if n != "none"]
    for name in chosen:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"{name} needs the {package} package: pip install {package}", field="train.report_to")
    return chosen


def check_train_options(cfg: TrainConfig, has_eval_rows: bool | None = None) -> None:
    """Pre-flight: trackers installed; keep-best / early stopping / eval_steps only with eval rows to score."""
    trackers(cfg)
    if has_eval_rows is False:
        for name in ("load_best_model_at_end", "early_stopping_patience", "eval_steps"):
            if getattr(cfg, name):
                raise ConfigError(
                    "needs eval rows: set dataset.data_split below 1 so the dataset stage holds some out",
                    field=f"train.{name}",
                )


def step_count(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps the run will take: max_steps when set, else epochs x steps per epoch."""
    return cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs


def training_arguments(
    cfg: TrainConfig,
    work: Path,
    *,
    step_rows: int,
    eval_batch: int,
    total_steps: int,
    has_eval_rows: bool,
    cuda: bool,
    liger: bool,
) -> Any:
    """transformers' TrainingArguments for this run: `cfg`'s knobs, and the settings the token-budget trainer
    relies on (one batch per optimizer step, no column pruning, our own progress lines)."""
    import torch
    import transformers

    evals = "no" if not has_eval_rows else "steps" if cfg.eval_steps else "epoch"
    return transformers.TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=step_rows,  # not used for training: the StepSampler makes the batches
        per_device_eval_batch_size=eval_batch,
        gradient_accumulation_steps=1,  # one batch is one optimizer step; its micro-batches run in training_step
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.lr_warmup,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=max(1, total_steps // 200),
        eval_strategy=evals,
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=2,  # the newest complete one is enough to resume; rotation happens after a save completes
        report_to=trackers(cfg),
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_liger_kernel=liger,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own progress (see training.callbacks): HF's bar has no loss, no tokens/s
    )


def use_checkpointing(cfg: TrainConfig, cuda: bool, estimate: dict[str, int]) -> dict[str, Any]:
    """Whether to turn gradient checkpointing on, and why (recorded in metrics.json)."""
    if cfg.gradient_checkpointing != "auto":
        return {"applied": cfg.gradient_checkpointing == "true", "reason": "train.gradient_checkpointing"}
    if not cuda:
        return {"applied": False, "reason": "auto: off on CPU (memory is rarely the limit there)"}
    share = estimate["activations"] / max(1, estimate["total"])
    applied = share >= CHECKPOINTING_SHARE
    return {"applied": applied, "reason": f"auto: activations are {share:.0%} of the estimated peak"}


def enable_checkpointing(model: Any) -> bool:
    """Gradient checkpointing on the (PEFT-wrapped) model; the state read back from it."""
    # Non-reentrant: the frozen embeddings' output needs no requires_grad hook for gradients to reach the LoRAs.
    # transformers 5 renamed it (the old names warn); older releases have only the old names.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        on = model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        on = model.is_gradient_checkpointing
    model.config.use_cache = False
    return bool(on)


def point_tensorboard_at(trainer: Any, logs: Path) -> None:
    """transformers' TensorBoard callback writes under the Trainer's output_dir (the work directory's checkpoints)
    unless told: into `logs`, which the train stage moves into its output."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
            callback.logging_dir = str(logs)


def evals_of(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]


def best_eval(history: list[dict]) -> tuple[int, float] | None:
    """(step, loss) of the lowest eval loss; the earliest of equal ones."""
    evals = evals_of(history)
    return min(evals, key=lambda e: e[1]) if evals else None


def make_best_callback(cfg: TrainConfig, work: Path) -> Any:
    """A TrainerCallback for keep-best (weights kept aside at each new best) and early stopping."""
    from transformers import TrainerCallback

    class BestCallback(TrainerCallback):
        stopped_early = False

        def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> Any:
            evals = evals_of(state.log_history)
            if not evals:
                return control
            best = best_eval(state.log_history)
            if cfg.load_best_model_at_end and best == evals[-1] and state.is_world_process_zero:
                save_best(model, work, best)
            since = len(evals) - 1 - evals.index(best)
            if cfg.early_stopping_patience and since >= cfg.early_stopping_patience:
                log.info("train: early stop: %d evaluations not below step %d's eval loss", since, best[0])
                control.should_training_stop = True
                self.stopped_early = True
            return control

    return BestCallback()


def trainable_state(model: Any) -> dict[str, Any]:
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_best(model: Any, work: Path, best: tuple[int, float]) -> None:
    from safetensors.torch import save_file

    partial = work / f".{BEST_FILE}.partial"
    save_file(trainable_state(model), str(partial), metadata={"step": str(best[0]), "eval_loss": repr(best[1])})
    partial.replace(work / BEST_FILE)  # a kill mid-write leaves the previous best intact


def restore_best(model: Any, work: Path, history: list[dict]) -> dict[str, Any] | None:
    """Load the best evaluation's adapter weights into `model`; what was restored (None: no evaluation)."""
    best = best_eval(history)
    if best is None:
        return None
    from safetensors import safe_open

    path = work / BEST_FILE
    if not path.exists():
        raise StageError(f"keep-best: no saved weights for the best evaluation (step {best[0]})", field="train")
    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
        if step != best[0]:
            raise StageError(f"keep-best: saved weights are step {step}'s, the best eval is step {best[0]}'s")
        saved = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in saved:
                param.copy_(saved[name].to(param.device, param.dtype))
    return {"step": best[0], "eval_loss": best[1]}
