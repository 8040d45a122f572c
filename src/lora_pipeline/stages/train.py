"""Train stage: LoRA / QLoRA fine-tuning with transformers' Trainer + PEFT.

Reads `train.jsonl`/`eval.jsonl` from the dataset stage and writes `adapter/` (standard PEFT adapter +
tokenizer), `metrics.json` and `loss_chart.html`. Loss is on the assistant's tokens only.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from lora_pipeline.config import TrainConfig
from lora_pipeline.errors import StageError
from lora_pipeline.files import atomic_dir, package_versions, read_jsonl, write_json_atomic
from lora_pipeline.models import (
    check_quantization_available,
    first_line,
    load_base_model,
    load_tokenizer,
    quantization_settings,
    resolve_model,
)

log = logging.getLogger(__name__)

VERSIONED = ("lora-pipeline", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")


def train_adapter(cfg: TrainConfig, dataset_dir: Path, out: Path) -> Path:
    dataset_dir, out = Path(dataset_dir), Path(out)
    if not (dataset_dir / "train.jsonl").exists():
        raise StageError(f"no train.jsonl in {dataset_dir}: run the dataset stage first", field="train")
    quant = quantization_settings(cfg)
    check_quantization_available(quant, f"train.lora_load_in_{'4' if cfg.lora_load_in_4bit else '8'}bit")
    backend = choose_backend(cfg)

    import torch
    import transformers

    from lora_pipeline.tokenization import PadCollator, encode_chat, ensure_chat_template

    transformers.set_seed(cfg.seed)
    if not torch.cuda.is_available():
        torch.set_flush_denormal(True)  # denormal floats (tiny weights/grads) slow CPU math by up to ~10x
    model_ref = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_ref, cfg.trust_remote_code)
    ensure_chat_template(tokenizer)
    train_rows = _encode(read_jsonl(dataset_dir / "train.jsonl"), tokenizer, cfg, encode_chat)
    eval_path = dataset_dir / "eval.jsonl"
    eval_rows = _encode(read_jsonl(eval_path), tokenizer, cfg, encode_chat) if eval_path.exists() else []
    if not train_rows:
        raise StageError("no training row has an assistant token within max_seq_len", field="train.max_seq_len")

    micro, accum = batch_geometry(cfg, max(len(r["input_ids"]) for r in train_rows), world_size())
    model = load_base_model(model_ref, quant, cfg.trust_remote_code)
    if quant:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = _wrap_lora(model, cfg)
    use_liger = _liger_available(cfg)

    work = out.with_name(f".{out.name}.work")  # survives a crash, for resume; moved into `out` at the end
    steps_per_epoch = math.ceil(len(train_rows) / (micro * accum * world_size()))
    cuda = torch.cuda.is_available()
    args = transformers.TrainingArguments(
        output_dir=str(work / "checkpoints"),
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accum,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.lr_warmup,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=max(1, steps_per_epoch * cfg.epochs // 200),
        eval_strategy="epoch" if eval_rows else "no",
        save_strategy="epoch" if cfg.save_epoch else "no",
        report_to=[],
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        use_liger_kernel=use_liger,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not os.isatty(2),
    )
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows or None,
        data_collator=PadCollator(tokenizer.pad_token_id),
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started

    from lora_pipeline.report import write_loss_chart

    history = trainer.state.log_history
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp / "adapter")
        tokenizer.save_pretrained(tmp / "adapter")
        if (work / "checkpoints").exists():
            shutil.move(str(work / "checkpoints"), tmp / "checkpoints")
        target_tokens = sum(sum(t != -100 for t in r["labels"]) for r in train_rows) * cfg.epochs
        total_tokens = sum(len(r["input_ids"]) for r in train_rows) * cfg.epochs
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        write_json_atomic(
            {
                "train_loss": result.training_loss,
                "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
                "eval_loss": evals[-1] if evals else None,
                "steps": trainer.state.global_step,
                "epochs": cfg.epochs,
                "train_rows": len(train_rows),
                "eval_rows": len(eval_rows),
                "micro_batch_size": micro,
                "gradient_accumulation_steps": accum,
                "world_size": world_size(),
                "effective_batch_size": micro * accum * world_size(),
                "tokens": {"total": total_tokens, "target": target_tokens},
                "train_seconds": round(seconds, 3),
                "tokens_per_second": round(total_tokens / seconds, 1) if seconds else None,
                "backend": backend,
                "liger": use_liger,
                "quantization": quant,
                "trust_remote_code": cfg.trust_remote_code,
                "device": "cuda" if cuda else "cpu",
                "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                "base_model": model_ref,
                "versions": package_versions(VERSIONED),
                "history": history,
            },
            tmp / "metrics.json",
        )
        write_loss_chart(history, tmp / "loss_chart.html", title=f"LoRA training loss: {model_ref}")
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "train: loss %.4f after %d steps in %.1fs -> %s", result.training_loss, trainer.state.global_step, seconds, out
    )
    return out


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def batch_geometry(cfg: TrainConfig, longest: int, world: int = 1) -> tuple[int, int]:
    """(micro-batch, gradient accumulation) so that micro x accum x world ~= effective_batch_size.

    With micro_batch_size 0 the micro-batch is as large as max_tokens_per_gpu allows for the longest row.
    """
    per_rank = max(1, math.ceil(cfg.effective_batch_size / world))
    micro = cfg.micro_batch_size or max(1, cfg.max_tokens_per_gpu // max(1, longest))
    micro = min(micro, per_rank)
    accum = math.ceil(per_rank / micro)
    return math.ceil(per_rank / accum), accum


def choose_backend(cfg: TrainConfig) -> str:
    """The backend that will run. unsloth's integration comes with the training issue: until then, peft."""
    if cfg.backend == "unsloth":
        log.warning("train.backend: unsloth is not wired in yet; using transformers + peft")
    return "peft"


def _liger_available(cfg: TrainConfig) -> bool:
    if not cfg.use_liger:
        return False
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None:
        return True
    log.warning("train.use_liger: Liger kernels need CUDA and liger-kernel; training without them")
    return False


def _wrap_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    targets = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()] or "all-linear"
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.lora_use_rslora,
        use_dora=cfg.lora_use_dora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # peft names the modules it could not find
        raise StageError(first_line(exc), field="train.lora_target_modules") from None


def _encode(rows: list[dict], tokenizer: Any, cfg: TrainConfig, encode_chat: Any) -> list[dict]:
    encoded = [encode_chat(tokenizer, r["messages"], cfg.max_seq_len) for r in rows]
    dropped = sum(e is None for e in encoded)
    if dropped:
        log.warning("train: %d rows have no assistant token within max_seq_len=%d, skipped", dropped, cfg.max_seq_len)
    return [e for e in encoded if e is not None]
