"""Train stage: LoRA / QLoRA fine-tuning with transformers' Trainer + PEFT.

Reads `train.jsonl`/`eval.jsonl` from the dataset stage and writes `adapter/` (standard PEFT adapter +
tokenizer), `metrics.json` and `loss_chart.html`. Loss is on the assistant's tokens only.

The recipe, top to bottom (`_train`): setup, data, model, steps, trainer, estimate, train, save; each phase is
one function below, in the order it runs. The parts they put together are in `lora_pipeline.training`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lora_pipeline.chat_templates import apply_chat_template_option
from lora_pipeline.config import TrainConfig, parse_key_values
from lora_pipeline.errors import StageError
from lora_pipeline.files import atomic_dir, link_tree, read_jsonl, write_json_atomic
from lora_pipeline.logs import drop_library_notices
from lora_pipeline.models import (
    check_quantization_available,
    keep_cpu_4bit_weights_trainable,
    load_base_model,
    load_tokenizer,
    quantization_settings,
    resolve_model,
    wrap_lora,
)
from lora_pipeline.progress import TerminalLine
from lora_pipeline.registry.artifacts import canonical_adapter_config
from lora_pipeline.stages.outputs import ADAPTER, DATASET_RECORD, EVAL_ROWS, LOSS_CHART, METRICS, TRAIN_ROWS
from lora_pipeline.tokenization import PadCollator
from lora_pipeline.training import batching
from lora_pipeline.training.arguments import (
    check_train_options,
    enable_checkpointing,
    make_best_callback,
    point_tensorboard_at,
    restore_best,
    step_count,
    training_arguments,
    use_checkpointing,
)
from lora_pipeline.training.backends import choose_backend, liger_available, load_unsloth_model
from lora_pipeline.training.checkpoints import (
    checkpoint_step,
    link_epoch_checkpoints,
    make_checkpoint_callback,
    remove_incomplete_checkpoints,
    training_key,
)
from lora_pipeline.training.cpu import cpu_threads, keep_freed_memory
from lora_pipeline.training.distributed import prepare_work_dir_once, process_rank, sum_over_processes, world_size
from lora_pipeline.training.encoded_data import encode_rows, encoded_key, load_encoded, save_encoded
from lora_pipeline.training.launch import maybe_launch, worker_main
from lora_pipeline.training.packing import choose_padding_free, sample_packing
from lora_pipeline.training.records import (
    Data,
    Model,
    Outcome,
    Steps,
    loss_summary,
    run_metrics,
    small_dataset_warnings,
)

log = logging.getLogger(__name__)

# On CPU a forward + backward pass runs fastest per token at about 1k-4k tokens; at 16k it is half as fast (the
# activations outgrow the caches; measured on 2 cores, a 4-layer 256-wide Qwen2). Padding-free passes of 1k, 2k,
# 4k and 8k tokens ran within 3% of each other, and 2k needs half the memory of 4k. max_tokens_per_gpu is a GPU
# memory cap, so on CPU the passes are capped here as well.
CPU_PASS_TOKENS = 2048


def train_adapter(cfg: TrainConfig, dataset_dir: Path, out: Path) -> Path:
    """Train the adapter with `train.env_vars` set in this process's environment and torch's CPU threads set
    (see `cpu_threads`); both restored afterwards."""
    launched = maybe_launch(cfg, Path(dataset_dir), Path(out), worker_module=__name__)
    if launched is not None:
        return launched
    import torch

    env = parse_key_values(cfg.env_vars)
    if env:
        log.info("train.env_vars: %s set for training", ", ".join(env))  # names only: values may be secrets
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    threads_before = torch.get_num_threads()
    restore_heap = keep_freed_memory(not torch.cuda.is_available())
    try:
        return _train(cfg, dataset_dir, out)
    finally:
        restore_heap()
        torch.set_num_threads(threads_before)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _train(cfg: TrainConfig, dataset_dir: Path, out: Path) -> Path:
    dataset_dir, out = Path(dataset_dir), Path(out)
    quant, backend, threads_from = setup(cfg, dataset_dir)
    model_ref = resolve_model(cfg.model, fetch=True)
    tokenizer = load_tokenizer(model_ref, cfg.trust_remote_code)
    apply_chat_template_option(tokenizer, cfg.chat_template)  # saved with the adapter's tokenizer
    data = load_data(cfg, dataset_dir, out, model_ref, tokenizer)
    model = load_model(cfg, model_ref, tokenizer, quant, backend)
    steps = plan_steps(cfg, dataset_dir, out, data, model)
    live = TerminalLine() if os.isatty(2) else None
    trainer, best_callback = build_trainer(cfg, data, model, steps, live)
    memory_estimate, checkpointing = estimate_memory_use(cfg, data, model, steps)
    seconds, memory_peak, batch_stats, eta, threads_used = run_training(trainer, steps, live)
    if steps.rank != 0:  # under torchrun every rank trains; one writes
        return out
    outcome = Outcome(
        seconds=seconds,
        memory={"estimate": memory_estimate, "peak": memory_peak},
        checkpointing=checkpointing,
        batch_stats=batch_stats,
        eta=eta,
        threads={"torch": threads_used, "from": threads_from},
        stopped_early=best_callback.stopped_early,
    )
    save_outputs(cfg, dataset_dir, out, data, model, steps, trainer, outcome)
    return out


def setup(cfg: TrainConfig, dataset_dir: Path) -> tuple[dict[str, Any] | None, str, str]:
    """Checks that need no model, then torch's threads, seed and float mode; (quantization, backend, where the
    thread count came from)."""
    if not (dataset_dir / TRAIN_ROWS).exists():
        raise StageError(f"no train.jsonl in {dataset_dir}: run the dataset stage first", field="train")
    quant = quantization_settings(cfg)
    check_quantization_available(quant, f"train.lora_load_in_{'4' if cfg.lora_load_in_4bit else '8'}bit")
    check_train_options(cfg, has_eval_rows=(dataset_dir / EVAL_ROWS).exists())
    backend = choose_backend(cfg)
    drop_library_notices()

    import torch
    import transformers

    threads, threads_from = cpu_threads(cfg.threads)
    torch.set_num_threads(threads)
    log.info("train: %d CPU thread%s for torch (%s)", threads, "s" if threads != 1 else "", threads_from)
    transformers.set_seed(cfg.seed)
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal floats (tiny weights/grads) slow CPU math by up to ~10x
    return quant, backend, threads_from


def load_data(cfg: TrainConfig, dataset_dir: Path, out: Path, model_ref: str, tokenizer: Any) -> Data:
    """The dataset stage's rows, tokenized; at least one train row with a target token."""
    # Tokenized data is kept by content (train.data_output_dir, else inside this stage's output), so a rerun
    # on the same data, tokenizer and template skips rendering and tokenizing every row.
    data_root = Path(cfg.data_output_dir) if cfg.data_output_dir else out / "data"
    tokenizer_dir = Path(model_ref) if Path(model_ref).is_dir() else None
    data_key = encoded_key(dataset_dir, tokenizer_dir, f"{model_ref}\0{tokenizer.chat_template}", cfg.max_seq_len)
    cached = load_encoded(data_root, data_key)
    if cached:
        train_rows, eval_rows = cached
    else:
        train_rows = encode_rows(read_jsonl(dataset_dir / TRAIN_ROWS), tokenizer, cfg)
        eval_path = dataset_dir / EVAL_ROWS
        eval_rows = encode_rows(read_jsonl(eval_path), tokenizer, cfg) if eval_path.exists() else []
        if cfg.data_output_dir and train_rows:
            save_encoded(data_root, data_key, train_rows, eval_rows)
    if not train_rows:
        raise StageError("no training row has an assistant token within max_seq_len", field="train.max_seq_len")
    check_train_options(cfg, has_eval_rows=bool(eval_rows))
    return Data(train_rows, eval_rows, data_key)


def load_model(cfg: TrainConfig, model_ref: str, tokenizer: Any, quant: dict[str, Any] | None, backend: str) -> Model:
    """The base model, quantized as asked, with the LoRA on it (on the fused forward where it applies)."""
    if backend == "unsloth":
        model, _ = load_unsloth_model(model_ref, cfg, quant)
        # unsloth runs attention its own way: rows are padded per micro-batch there
        padding_free = {"applied": False, "reason": "unsloth runs its own attention"}
        fused = 0
    else:
        model = load_base_model(model_ref, quant, cfg.trust_remote_code)
        if quant:
            keep_cpu_4bit_weights_trainable(model)
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        padding_free = choose_padding_free(model, cfg)
        model = wrap_lora(model, cfg)
        from lora_pipeline.training.fused_lora import fuse_lora_linears

        fused = fuse_lora_linears(model)
    return Model(model, model_ref, tokenizer, quant, backend, padding_free, fused, liger_available(cfg))


def plan_steps(cfg: TrainConfig, dataset_dir: Path, out: Path, data: Data, model: Model) -> Steps:
    """Optimizer steps per epoch and in all, the processes, the pass budget, and the checkpoint to resume from."""
    import torch

    step_rows = cfg.effective_batch_size
    packing, step_items = sample_packing(cfg, data.train, model.padding_free["applied"])
    steps_per_epoch = -(-len(step_items) // step_rows)
    world, rank = world_size(), process_rank()
    if cfg.fsdp_sharding_strategy:
        # A LoRA's trainable state is small: each process holds the whole (frozen, possibly 4-bit) base, and DDP
        # all-reduces only the adapter's gradients. Sharding is not implemented; say so rather than ignore it.
        log.warning(
            "train.fsdp_sharding_strategy %s: not applied; %s",
            cfg.fsdp_sharding_strategy,
            "processes train with DDP, each holding the whole model" if world > 1 else "this run has one process",
        )
    total_steps = step_count(cfg, steps_per_epoch)
    notes = small_dataset_warnings(len(data.train), step_rows, cfg.epochs, steps_per_epoch, total_steps)
    for note in notes:
        log.warning("train: %s", note)
    work = out.with_name(f".{out.name}.work")
    cuda = torch.cuda.is_available()
    resume = prepare_work_dir_once(work, training_key(cfg, dataset_dir), world, rank, cuda)
    return Steps(
        rows=step_rows,
        items=step_items,
        packing=packing,
        per_epoch=steps_per_epoch,
        total=total_steps,
        tokens_per_step=data.tokens / steps_per_epoch,
        pass_tokens=cfg.max_tokens_per_gpu if cuda else min(cfg.max_tokens_per_gpu, CPU_PASS_TOKENS),
        world=world,
        rank=rank,
        cuda=cuda,
        work=work,
        resume=resume,
        resumed_at=checkpoint_step(resume) if resume else 0,
        notes=notes,
    )


def build_trainer(
    cfg: TrainConfig, data: Data, model: Model, steps: Steps, live: TerminalLine | None
) -> tuple[Any, Any]:
    """The token-budget Trainer with the run's callbacks; (trainer, the keep-best / early-stopping callback)."""
    import transformers

    from lora_pipeline.training.callbacks import ProgressLogCallback
    from lora_pipeline.training.trainer import TokenBudgetTrainer

    longest = max(len(r["input_ids"]) for r in (data.eval or data.train))
    # evaluation's batches are padded: the budget counts padding
    eval_batch = min(cfg.micro_batch_size or 64, max(1, steps.pass_tokens // longest))
    args = training_arguments(
        cfg,
        steps.work,
        step_rows=steps.rows,
        eval_batch=eval_batch,
        total_steps=steps.total,
        has_eval_rows=bool(data.eval),
        cuda=steps.cuda,
        liger=model.liger,
    )
    padding_free = model.padding_free["applied"]
    trainer = TokenBudgetTrainer(
        model=model.module,
        args=args,
        train_dataset=steps.items,
        eval_dataset=data.eval or None,
        data_collator=PadCollator(model.tokenizer.pad_token_id),  # evaluation's batches
        step_sampler=batching.StepSampler(
            [len(r["input_ids"]) for r in steps.items],
            steps.rows,
            cfg.seed,
            # Grouping rows by length only saves padding: padding-free steps take rows as shuffled (measured: as
            # fast or faster, and the loss per token matches TRL's random batches where grouped steps did not)
            mega_steps=1 if padding_free else batching.MEGA_STEPS,
            rank=steps.rank,
            world=steps.world,
        ),
        step_collator=batching.StepCollator(
            model.tokenizer.pad_token_id,
            steps.pass_tokens,
            cfg.micro_batch_size,
            padding_free=padding_free,
            targets_only=not model.liger,  # Liger's fused loss never materialises the logits at all
        ),
    )
    trainer.add_callback(make_checkpoint_callback(cfg, steps.work / "epoch_checkpoints", steps.per_epoch))
    best_callback = make_best_callback(cfg, steps.work)
    trainer.add_callback(best_callback)
    point_tensorboard_at(trainer, steps.work / "logs")
    # transformers would print every logged dict raw: our progress line instead (redrawn on a terminal)
    for printer in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(printer)
    trainer.add_callback(ProgressLogCallback(steps.tokens_per_step, log, live=live))
    if steps.resume:
        log.info("train: resuming from step %d of %d", steps.resumed_at, steps.total)
    return trainer, best_callback


def estimate_memory_use(
    cfg: TrainConfig, data: Data, model: Model, steps: Steps
) -> tuple[dict[str, int], dict[str, Any]]:
    """The memory estimate of the largest pass (logged), and gradient checkpointing where it is worth it."""
    from lora_pipeline.training.estimate import describe, estimate_memory

    target_share = data.targets / max(1, data.tokens)
    # the largest pass: the budget, or a whole step of the longest rows when that is less
    widest = sorted((len(r["input_ids"]) for r in steps.items), reverse=True)[: -(-steps.rows // steps.world)]
    peak_pass = min(steps.pass_tokens, max(sum(widest), widest[0]))
    logit_tokens = int(peak_pass * target_share) if model.padding_free["applied"] and not model.liger else None
    memory_estimate = estimate_memory(model.module, peak_pass, logit_tokens)
    log.info("train: %s", describe(memory_estimate, peak_pass))
    if model.backend == "unsloth":
        return memory_estimate, {"applied": False}
    checkpointing = use_checkpointing(cfg, steps.cuda, memory_estimate)
    if checkpointing["applied"]:
        checkpointing["applied"] = enable_checkpointing(model.module)
    return memory_estimate, checkpointing


def run_training(trainer: Any, steps: Steps, live: TerminalLine | None) -> tuple[float, dict, dict, Any, int]:
    """Train (resuming from the newest complete checkpoint); the seconds it took, the peak memory, the batching
    over all processes, the time estimate's callback and torch's threads."""
    import torch

    from lora_pipeline.training.estimate import PeakMemory, make_eta_callback

    threads_used = torch.get_num_threads()  # what torch runs with, read back
    eta = make_eta_callback(steps.total, log)
    trainer.add_callback(eta)
    peak = PeakMemory()
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(steps.resume) if steps.resume else None)
    except BaseException:
        if steps.rank == 0:  # a save cut short (ENOSPC, a crash) leaves a partial checkpoint: not kept on disk
            remove_incomplete_checkpoints(steps.work / "checkpoints")
        raise
    finally:
        memory_peak = peak.stop()
        if live is not None:
            live.close()  # an interrupted run leaves no half-drawn line
    seconds = time.perf_counter() - started
    batch_stats = trainer.batch_stats.as_dict(sum_over_processes(trainer.batch_stats.counts(), steps.world))
    return seconds, memory_peak, batch_stats, eta, threads_used


def save_outputs(
    cfg: TrainConfig,
    dataset_dir: Path,
    out: Path,
    data: Data,
    model: Model,
    steps: Steps,
    trainer: Any,
    outcome: Outcome,
) -> None:
    """Rank 0: the adapter (the best evaluation's with keep-best) and its tokenizer, metrics.json, the loss chart
    and what travels with them, written into `out` at once; the work directory removed."""
    from lora_pipeline.reports.loss_chart import write_loss_chart

    history = trainer.state.log_history
    best = restore_best(model.module, steps.work, history) if cfg.load_best_model_at_end else None
    with atomic_dir(out) as tmp:
        model.module.save_pretrained(tmp / ADAPTER)
        canonical_adapter_config(tmp / ADAPTER)
        model.tokenizer.save_pretrained(tmp / ADAPTER)
        if cfg.merge:
            from lora_pipeline.export.merged import export_merged

            export_merged(model.ref, tmp / ADAPTER, tmp / "merged", cfg.trust_remote_code)
        link_epoch_checkpoints(steps.work / "epoch_checkpoints", tmp / "checkpoints")
        if (steps.work / "logs").exists():
            link_tree(steps.work / "logs", tmp / "logs")
        if not cfg.data_output_dir:
            save_encoded(tmp / "data", data.key, data.train, data.eval)
        # The held-out rows and the dataset record travel with the adapter: the eval stage's `split` task and
        # the registry's lineage read them from here when only this output is mounted (a Kubeflow pod).
        for name in (EVAL_ROWS, DATASET_RECORD):
            if (dataset_dir / name).exists():
                shutil.copy(dataset_dir / name, tmp / name)
        metrics = run_metrics(cfg, data, model, steps, trainer, outcome, best)
        write_json_atomic(metrics, tmp / METRICS)
        write_loss_chart(history, tmp / LOSS_CHART, title=f"LoRA training loss: {model.ref}")
    shutil.rmtree(steps.work, ignore_errors=True)
    summary = loss_summary(metrics["final_loss"], metrics["mean_loss"])
    log.info("train: %s after %d steps in %.1fs -> %s", summary, trainer.state.global_step, outcome.seconds, out)


if __name__ == "__main__":
    # Each torchrun process's entry (see training.launch). The stage is imported under its own name, so that its
    # logger is `lora_pipeline.stages.train` (the package's log levels) rather than `__main__`.
    from lora_pipeline.stages.train import train_adapter as stage_entry

    sys.exit(worker_main(stage_entry, sys.argv[1:]))
