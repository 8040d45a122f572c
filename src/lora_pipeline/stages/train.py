"""Train stage: LoRA / QLoRA fine-tuning with transformers' Trainer + PEFT.

Reads `train.jsonl`/`eval.jsonl` from the dataset stage and writes `adapter/` (standard PEFT adapter +
tokenizer), `metrics.json` and `loss_chart.html`. Loss is on the assistant's tokens only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from lora_pipeline.config import TrainConfig, parse_key_values
from lora_pipeline.errors import StageError
from lora_pipeline.files import atomic_dir, package_versions, read_jsonl, write_json_atomic
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
    make_checkpoint_callback,
    move_epoch_checkpoints,
    remove_incomplete_checkpoints,
    training_key,
)
from lora_pipeline.training.cpu import cpu_threads, keep_freed_memory
from lora_pipeline.training.encoded_data import encode_rows, encoded_key, load_encoded, save_encoded
from lora_pipeline.training.launch import prepare_work_dir_once, process_rank, sum_over_processes, world_size
from lora_pipeline.training.packing import choose_padding_free, sample_packing

log = logging.getLogger(__name__)

MIN_STEPS = 10  # fewer optimizer steps than this and a LoRA barely leaves its init
# On CPU a forward + backward pass runs fastest per token at about 1k-4k tokens; at 16k it is half as fast (the
# activations outgrow the caches; measured on 2 cores, a 4-layer 256-wide Qwen2). Padding-free passes of 1k, 2k,
# 4k and 8k tokens ran within 3% of each other, and 2k needs half the memory of 4k. max_tokens_per_gpu is a GPU
# memory cap, so on CPU the passes are capped here as well.
CPU_PASS_TOKENS = 2048
# Library warnings that say nothing about the user's settings, by logger name: dropped from the run's output.
VERSIONED = ("lora-pipeline", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")


def train_adapter(cfg: TrainConfig, dataset_dir: Path, out: Path) -> Path:
    """Train the adapter with `train.env_vars` set in this process's environment and torch's CPU threads set
    (see `cpu_threads`); both restored afterwards."""
    from lora_pipeline.training.launch import maybe_launch

    launched = maybe_launch(cfg, Path(dataset_dir), Path(out))
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
    if not (dataset_dir / "train.jsonl").exists():
        raise StageError(f"no train.jsonl in {dataset_dir}: run the dataset stage first", field="train")
    quant = quantization_settings(cfg)
    check_quantization_available(quant, f"train.lora_load_in_{'4' if cfg.lora_load_in_4bit else '8'}bit")
    check_train_options(cfg, has_eval_rows=(dataset_dir / "eval.jsonl").exists())
    backend = choose_backend(cfg)
    drop_library_notices()

    import torch
    import transformers

    from lora_pipeline.chat_templates import apply_chat_template_option
    from lora_pipeline.progress import TerminalLine, make_progress_callback
    from lora_pipeline.sources import MODEL_SCHEMES
    from lora_pipeline.tokenization import PadCollator
    from lora_pipeline.training.batching import MEGA_STEPS, StepCollator, StepSampler, make_trainer_class

    threads, threads_from = cpu_threads(cfg.threads)
    torch.set_num_threads(threads)
    log.info("train: %d CPU thread%s for torch (%s)", threads, "s" if threads != 1 else "", threads_from)
    transformers.set_seed(cfg.seed)
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal floats (tiny weights/grads) slow CPU math by up to ~10x
    model_ref = resolve_model(cfg.model, fetch=True)
    tokenizer = load_tokenizer(model_ref, cfg.trust_remote_code)
    apply_chat_template_option(tokenizer, cfg.chat_template)  # saved with the adapter's tokenizer
    # Tokenized data is kept by content (train.data_output_dir, else inside this stage's output), so a rerun
    # on the same data, tokenizer and template skips rendering and tokenizing every row.
    data_root = Path(cfg.data_output_dir) if cfg.data_output_dir else out / "data"
    tokenizer_dir = Path(model_ref) if Path(model_ref).is_dir() else None
    data_key = encoded_key(dataset_dir, tokenizer_dir, f"{model_ref}\0{tokenizer.chat_template}", cfg.max_seq_len)
    cached = load_encoded(data_root, data_key)
    if cached:
        train_rows, eval_rows = cached
    else:
        train_rows = encode_rows(read_jsonl(dataset_dir / "train.jsonl"), tokenizer, cfg)
        eval_path = dataset_dir / "eval.jsonl"
        eval_rows = encode_rows(read_jsonl(eval_path), tokenizer, cfg) if eval_path.exists() else []
        if cfg.data_output_dir and train_rows:
            save_encoded(data_root, data_key, train_rows, eval_rows)
    if not train_rows:
        raise StageError("no training row has an assistant token within max_seq_len", field="train.max_seq_len")
    check_train_options(cfg, has_eval_rows=bool(eval_rows))

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
    use_liger = liger_available(cfg)

    step_rows = cfg.effective_batch_size  # per optimizer step, over all processes (each takes its share)
    packing, step_items = sample_packing(cfg, train_rows, padding_free["applied"])
    steps_per_epoch = math.ceil(len(step_items) / step_rows)
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
    notes = _small_dataset_warnings(len(train_rows), step_rows, cfg.epochs, steps_per_epoch, total_steps)
    work = out.with_name(f".{out.name}.work")  # checkpoints survive kill -9 and Ctrl-C, for resume
    cuda = torch.cuda.is_available()
    resume = prepare_work_dir_once(work, training_key(cfg, dataset_dir), world, rank, cuda)
    pass_tokens = cfg.max_tokens_per_gpu if cuda else min(cfg.max_tokens_per_gpu, CPU_PASS_TOKENS)
    longest = max(len(r["input_ids"]) for r in (eval_rows or train_rows))
    eval_batch = min(cfg.micro_batch_size or 64, max(1, pass_tokens // longest))  # padded: the budget counts padding
    tty = os.isatty(2)
    args = transformers.TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=step_rows,  # not used for training: the StepSampler makes the batches
        per_device_eval_batch_size=eval_batch,
        gradient_accumulation_steps=1,  # one batch is one optimizer step; its micro-batches run in training_step
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.lr_warmup,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=max(1, total_steps // 200),
        save_strategy="steps" if cfg.checkpoint_steps else "no",
        save_steps=cfg.checkpoint_steps or 500,
        save_total_limit=2,  # the newest complete one is enough to resume; rotation happens after a save completes
        **training_arguments(cfg, bool(eval_rows)),  # max_steps, weight_decay, evaluation, trackers
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_liger_kernel=use_liger,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own progress (below), on a terminal too: HF's bar has no loss, no tokens/s
    )
    trainer = make_trainer_class()(
        model=model,
        args=args,
        train_dataset=step_items,
        eval_dataset=eval_rows or None,
        data_collator=PadCollator(tokenizer.pad_token_id),  # evaluation's batches
        step_sampler=StepSampler(
            [len(r["input_ids"]) for r in step_items],
            step_rows,
            cfg.seed,
            # Grouping rows by length only saves padding: padding-free steps take rows as shuffled (measured: as
            # fast or faster, and the loss per token matches TRL's random batches where grouped steps did not)
            mega_steps=1 if padding_free["applied"] else MEGA_STEPS,
            rank=rank,
            world=world,
        ),
        step_collator=StepCollator(
            tokenizer.pad_token_id,
            pass_tokens,
            cfg.micro_batch_size,
            padding_free=padding_free["applied"],
            targets_only=not use_liger,  # Liger's fused loss never materialises the logits at all
        ),
    )
    epoch_dir = work / "epoch_checkpoints"
    trainer.add_callback(make_checkpoint_callback(cfg, epoch_dir, steps_per_epoch))
    best_callback = make_best_callback(cfg, work)
    trainer.add_callback(best_callback)
    point_tensorboard_at(trainer, work / "logs")
    # transformers would print every logged dict raw: our progress line instead (redrawn on a terminal)
    tokens_per_step = sum(len(r["input_ids"]) for r in train_rows) / steps_per_epoch
    for printer in (transformers.trainer_callback.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(printer)
    live = TerminalLine() if tty else None
    trainer.add_callback(make_progress_callback(tokens_per_step, log, live=live))
    resumed_at = checkpoint_step(resume) if resume else 0
    if resume:
        log.info("train: resuming from step %d of %d", resumed_at, total_steps)
    threads_used = torch.get_num_threads()  # what torch runs with, read back
    from lora_pipeline.training.estimate import PeakMemory, describe, estimate_memory, make_eta_callback

    target_share = sum(sum(t != -100 for t in r["labels"]) for r in train_rows) / max(1, tokens_in(train_rows))
    # the largest pass: the budget, or a whole step of the longest rows when that is less
    widest = sorted((len(r["input_ids"]) for r in step_items), reverse=True)[: -(-step_rows // world)]
    peak_pass = min(pass_tokens, max(sum(widest), widest[0]))
    logit_tokens = int(peak_pass * target_share) if padding_free["applied"] and not use_liger else None
    memory_estimate = estimate_memory(model, peak_pass, logit_tokens)
    log.info("train: %s", describe(memory_estimate, peak_pass))
    checkpointing = use_checkpointing(cfg, cuda, memory_estimate) if backend != "unsloth" else {"applied": False}
    if checkpointing["applied"]:
        checkpointing["applied"] = enable_checkpointing(model)
    eta = make_eta_callback(total_steps, log)
    trainer.add_callback(eta)
    peak = PeakMemory()
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except BaseException:
        if rank == 0:  # a save cut short (ENOSPC, a crash) leaves a partial checkpoint: not kept on disk
            remove_incomplete_checkpoints(work / "checkpoints")
        raise
    finally:
        memory_peak = peak.stop()
        if live is not None:
            live.close()  # an interrupted run leaves no half-drawn line
    seconds = time.perf_counter() - started
    batch_stats = trainer.batch_stats.as_dict(sum_over_processes(trainer.batch_stats.counts(), world))
    if rank != 0:  # under torchrun every rank trains; one writes
        return out

    from lora_pipeline.reports.loss_chart import write_loss_chart

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    # The mean of the logged losses, which a resumed run restores from its checkpoint; the Trainer's own
    # `training_loss` averages only the steps run by the last process. It includes the random-init start, so
    # it is always labelled "mean": the final loss is where training ended.
    mean_loss = sum(losses) / len(losses) if losses else None
    final_loss = losses[-1] if losses else None
    total_tokens = round(tokens_per_step * total_steps)
    tokens_here = total_tokens * (trainer.state.global_step - resumed_at) / total_steps
    eval_seconds = sum(h["eval_runtime"] for h in history if "eval_runtime" in h and h.get("step", 0) > resumed_at)
    best = restore_best(model, work, history) if cfg.load_best_model_at_end else None
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "adapter")
        canonical_adapter_config(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")
        if cfg.merge:
            from lora_pipeline.export.merged import export_merged

            export_merged(model_ref, tmp / "adapter", tmp / "merged", cfg.trust_remote_code)
        move_epoch_checkpoints(epoch_dir, tmp / "checkpoints")
        if (work / "logs").exists():
            shutil.move(str(work / "logs"), tmp / "logs")
        if not cfg.data_output_dir:
            save_encoded(tmp / "data", data_key, train_rows, eval_rows)
        # The held-out rows and the dataset record travel with the adapter: the eval stage's `split` task and
        # the registry's lineage read them from here when only this output is mounted (a Kubeflow pod).
        for name in ("eval.jsonl", "dataset.json"):
            if (dataset_dir / name).exists():
                shutil.copy(dataset_dir / name, tmp / name)
        targets_per_epoch = sum(sum(t != -100 for t in r["labels"]) for r in train_rows)
        target_tokens = round(targets_per_epoch * total_steps / steps_per_epoch)
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        write_json_atomic(
            {
                "final_loss": final_loss,
                "mean_loss": mean_loss,
                "eval_loss": best["eval_loss"] if best else evals[-1] if evals else None,
                "best": best,  # keep-best: the evaluation whose adapter was written
                "stopped_early": best_callback.stopped_early,
                "steps": trainer.state.global_step,
                "resumed_from_step": resumed_at or None,
                "epochs": cfg.epochs,
                "max_steps": cfg.max_steps if cfg.max_steps > 0 else None,
                "train_rows": len(train_rows),
                "eval_rows": len(eval_rows),
                "world_size": world,
                # rows (packed sequences with sample packing) per optimizer step over all processes; each step is
                # cut into passes by the token budget ("batching": how many per step, all processes together)
                "effective_batch_size": step_rows,
                "tokens": {"total": total_tokens, "target": target_tokens},
                "batching": {"max_tokens_per_pass": pass_tokens, **batch_stats},
                "padding_free": padding_free,
                "gradient_checkpointing": checkpointing,
                # read back from the optimizer: what it applied to each parameter group
                "weight_decay": sorted({g["weight_decay"] for g in trainer.optimizer.param_groups}),
                "trackers": list(args.report_to),
                "fused_lora_layers": fused,  # LoRA linears on the fused forward (see fused_lora)
                "sample_packing": packing,
                "threads": {"torch": threads_used, "from": threads_from},
                "train_seconds": round(seconds, 3),
                "memory": {"estimate": memory_estimate, "peak": memory_peak},
                # predicted from the first steps (no evaluation in them) vs the seconds this run trained
                "time": {"estimate": eta.as_dict(), "train_seconds": round(seconds, 3)},
                # tokens trained (all processes), over the time outside the per-epoch evaluation
                "tokens_per_second": round(tokens_here / max(1e-9, seconds - eval_seconds), 1),
                "backend": backend,
                "merged": cfg.merge,
                "liger": use_liger,
                "quantization": quant,
                "trust_remote_code": cfg.trust_remote_code,
                "device": "cuda" if cuda else "cpu",
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "base_model": model_ref,
                "base_model_uri": cfg.model if cfg.model.startswith(MODEL_SCHEMES) else None,  # eval refetches it
                "warnings": notes,
                "versions": package_versions(VERSIONED),
                "history": history,
            },
            tmp / "metrics.json",
        )
        write_loss_chart(history, tmp / "loss_chart.html", title=f"LoRA training loss: {model_ref}")
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "train: %s after %d steps in %.1fs -> %s",
        loss_summary(final_loss, mean_loss),
        trainer.state.global_step,
        seconds,
        out,
    )
    return out


def loss_summary(final: float | None, mean: float | None) -> str:
    """`final loss 0.5123 (mean over the run 1.3754)`: the summary line leads with where training ended."""
    if final is None:
        return "no loss logged"
    return f"final loss {final:.4f}" + (f" (mean over the run {mean:.4f})" if mean is not None else "")


def tokens_in(rows: list[dict]) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def _small_dataset_warnings(rows: int, batch: int, epochs: int, steps_per_epoch: int, steps: int) -> list[str]:
    """Too few optimizer steps leave the adapter near its zero init: say so once, with the numbers."""
    if steps >= MIN_STEPS or steps < steps_per_epoch * epochs:  # fewer by max_steps: the user's choice
        return []
    message = (
        f"only {steps} optimizer step{'s' if steps != 1 else ''} ({rows} rows, effective_batch_size {batch}, "
        f"{epochs} epoch{'s' if epochs != 1 else ''}): training will barely move the adapter; "
        "lower --train.effective_batch_size or add epochs"
    )
    log.warning("train: %s", message)
    return [message]


def canonical_adapter_config(adapter: Path) -> None:
    """PEFT writes `target_modules` from a set, in an order that changes with the interpreter's hash seed:
    sorted, the same training gives the same bytes, so the registry recognises it as the same content."""
    path = Path(adapter) / "adapter_config.json"
    config = json.loads(path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True))
