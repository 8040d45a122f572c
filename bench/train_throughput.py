"""Training throughput: this package's train stage against TRL's SFTTrainer, on the same model and data.

A benchmark, not a test: it prints numbers and asserts nothing. For each model (the demo's tiny Qwen2, and a
larger random Qwen2: hidden 256, 4 layers) it generates mixed-length chat data (assistant answers sized so
that whole rows are 16..1024 tokens, log-uniform), then trains LoRA r=16 on every linear layer with the same
number of optimizer steps, effective batch, learning rate and schedule, in fp32 on the CPU:

  trl_default       TRL SFTTrainer + PEFT with TRL's own defaults (micro-batch 8 padded to its longest row,
                    gradient checkpointing on); bf16 off, as CPU training here is fp32
  trl_padding_free  TRL with padding_free=True (rows concatenated, position ids restart per row; transformers
                    builds the block-diagonal mask from them) and gradient checkpointing off
  ours              lora_pipeline's train stage with its defaults (token-budget steps of rows grouped by
                    length, padding-free passes with row-by-row attention, fused LoRA forward)
  ours_4bit         (only when named in --variants) ours on a 4-bit base (bitsandbytes NF4), the spec's
                    default; its weights and training peak RSS are printed beside ours'

Each variant runs in a process of its own (peak RSS is per process: VmHWM, not inherited from this one),
interleaved (A, B, C, A, B, C, ...) so that a slower or busier stretch of the machine does not land on one
variant. Real tokens/s is the data's
token count (the same for all) over the seconds spent in `Trainer.train` (model loading, tokenization and
saving excluded; nothing evaluates). Reported per variant: the median over repeats.

Run it on an otherwise idle machine: torch's OpenMP threads spin while they wait, so when other busy processes
share the cores every variant slows down many-fold, and unevenly (seen here: 5 s became 69 s).
"final loss" is the last step's loss, on different rows for ours (steps group rows by length) than for TRL;
"data loss" is comparable: the trained model's mean loss over every target token of the training data, labelled
the same way for all (computed after training, outside the timing; peak RSS includes it).

    .venv/bin/python bench/train_throughput.py                     # about 3 minutes on 2 idle cores
    .venv/bin/python bench/train_throughput.py --steps 16 --repeats 3 --models large
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("trl_default", "trl_padding_free", "ours")
EXTRA_VARIANTS = ("ours_4bit",)  # with --variants: ours with the spec's default 4-bit base (bitsandbytes NF4)
MODELS = ("demo", "large")
LARGE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8}
MAX_LEN = 1024
LORA = {"r": 16, "alpha": 32}
LR = 2e-4


# ---- setup (parent process) ----


def build_models(work: Path) -> dict[str, Path]:
    from lora_pipeline.demo import build_demo

    demo = build_demo(work / "home").model_dir
    large = work / "large"
    if not (large / "config.json").exists():
        save_random_model(large, "Qwen2", demo, max_position_embeddings=2048, **LARGE)  # random init, like the demo's
    return {"demo": Path(demo), "large": large}


def save_random_model(
    path: Path, architecture: str, tokenizer_dir: Path, dtype: str | None = None, **shape: object
) -> Path:
    """A random-init `architecture` ("Qwen2", "Llama") of `shape` with the demo's tokenizer, saved to `path`.
    Seeded: every run of a benchmark builds the same model, so that runs compare."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{architecture}ForCausalLM")(config)
    (model.to(getattr(torch, dtype)) if dtype else model).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_rows(tokenizer_dir: Path, n: int, seed: int) -> tuple[list[dict], list[int]]:
    """n chat rows whose rendered length is log-uniform in 16..MAX_LEN tokens, and those lengths."""
    from transformers import AutoTokenizer

    from lora_pipeline.tokenization import encode_chat

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.model_max_length = 10**9  # the filler below is long on purpose
    rng = random.Random(seed)
    words = ["the", "cat", "dog", "sat", "on", "a", "mat", "market", "price", "rose", "fell", "team", "won", "rain"]
    filler = " ".join(rng.choice(words) for _ in range(4 * MAX_LEN))
    offsets = tokenizer(filler, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    rows, lengths = [], []
    for i in range(n):
        target = int(16 * (MAX_LEN / 16) ** rng.random())
        question = f"Note {i}: what comes next?"
        empty = encode_chat(tokenizer, _messages(question, "x"), 10 * MAX_LEN)
        answer_tokens = max(1, target - len(empty["input_ids"]) + 1)
        start = rng.randrange(0, len(offsets) - answer_tokens - 1)
        answer = filler[offsets[start][0] : offsets[start + answer_tokens - 1][1]].strip() or "cat"
        messages = _messages(question, answer)
        encoded = encode_chat(tokenizer, messages, MAX_LEN)
        rows.append({"messages": messages})
        lengths.append(len(encoded["input_ids"]))
    return rows, lengths


def _messages(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ---- one training run (child process) ----


def bench_config(model: Path, batch: int, **options: object) -> object:
    """The train stage's config for one benchmark run: one epoch, the shared LoRA and schedule, no checkpoints."""
    from lora_pipeline.config import TrainConfig

    return TrainConfig(
        model=str(model),
        effective_batch_size=batch,
        epochs=1,
        learning_rate=LR,
        max_seq_len=MAX_LEN,
        lora_r=LORA["r"],
        lora_alpha=LORA["alpha"],
        checkpoint_steps=0,
        checkpoint_minutes=0.0,
        **options,
    )


def run_ours(
    model: Path, data: Path, batch: int, out: Path, four_bit: bool = False, dropout: float = 0.0, seed: int = 42
) -> dict:
    from lora_pipeline.stages.train import train_adapter

    cfg = bench_config(model, batch, lora_load_in_4bit=four_bit, use_liger=False, lora_dropout=dropout, seed=seed)
    metrics = json.loads((train_adapter(cfg, data, out) / "metrics.json").read_text())
    batching = metrics["batching"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out / "adapter")
    return {
        "seconds": metrics["train_seconds"],
        "final_loss": metrics["final_loss"],
        "data_loss": data_loss(tuned, model, data),
        "steps": metrics["steps"],
        "padding_share": batching["padding_share"],
        "micro_batches_per_step": batching["micro_batches_per_step"],
        "train_peak_rss_mib": round(metrics["memory"]["peak"]["rss_peak_bytes"] / 2**20, 1),
        "weights_mib": round(metrics["memory"]["estimate"]["weights"] / 2**20, 1),
    }


class CountingCollator:
    """Wraps TRL's collator to count the real and padded tokens of the batches it makes."""

    def __init__(self, inner: object) -> None:
        self.inner, self.real, self.padded = inner, 0, 0

    def __call__(self, examples: list) -> dict:
        batch = self.inner(examples)
        self.padded += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


def run_trl(
    model: Path,
    data: Path,
    batch: int,
    out: Path,
    padding_free: bool,
    cuda: bool = False,
    dropout: float = 0.0,
    seed: int = 42,
) -> dict:
    """TRL's SFTTrainer + PEFT on the same rows: fp32 on the CPU, or bf16 on CUDA (cuda_backends.py)."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    # prompt/completion rows: TRL's default (completion_only_loss) is then loss on the assistant's tokens, as ours.
    ds = datasets.Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])
    micro = 8  # TRL's default per_device_train_batch_size
    # Rows are at most MAX_LEN tokens already; TRL enforces max_length only with packing when padding-free.
    extra = {"padding_free": True, "gradient_checkpointing": False, "max_length": None} if padding_free else {}
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=max(1, batch // micro),
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="cosine",
        bf16=cuda,
        use_cpu=not cuda,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=seed,
        **{"max_length": MAX_LEN, **extra},
    )
    peft_config = LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, **({"dtype": "bfloat16"} if cuda else {})),
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=peft_config,
    )
    counting = CountingCollator(trainer.data_collator)
    trainer.data_collator = counting
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "seconds": round(seconds, 3),
        "final_loss": losses[-1] if losses else None,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "data_loss": data_loss(trainer.model, model, data),
        "steps": trainer.state.global_step,
        "padding_share": round(1 - counting.real / counting.padded, 4) if counting.padded else 0.0,
        "micro_batches_per_step": max(1, batch // micro),
    }


def data_loss(tuned: object, model: Path, data: Path) -> float:
    """The trained model's mean loss over every target token of the training rows, labelled the same way for all
    variants (assistant tokens): comparable where the last step's loss is not (its rows differ)."""
    import torch
    from transformers import AutoTokenizer

    from lora_pipeline.tokenization import IGNORE_INDEX, PadCollator, encode_chat

    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    encoded = sorted((encode_chat(tokenizer, r["messages"], MAX_LEN) for r in rows), key=lambda e: len(e["input_ids"]))
    total, count = 0.0, 0
    tuned.eval()
    with torch.no_grad():
        for i in range(0, len(encoded), 8):
            batch = PadCollator(tokenizer.pad_token_id)(encoded[i : i + 8])
            batch = {k: v.to(tuned.device) for k, v in batch.items()}
            logits = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            )
            total, count = total + float(loss), count + int((labels != IGNORE_INDEX).sum())
    return round(total / count, 4)


def child(variant: str, model: Path, data: Path, batch: int, dropout: float, seed: int) -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if variant.startswith("ours"):
            result = run_ours(model, data, batch, out, four_bit=variant == "ours_4bit", dropout=dropout, seed=seed)
        else:
            padding_free = variant == "trl_padding_free"
            result = run_trl(model, data, batch, out, padding_free=padding_free, dropout=dropout, seed=seed)
    from lora_pipeline.training.estimate import kernel_peak_rss

    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's peak (here, the model building's)
    result["peak_rss_mib"] = round((kernel_peak_rss() or 0) / 2**20, 1)
    print("RESULT " + json.dumps(result))


def run_child(variant: str, model: Path, data: Path, batch: int, dropout: float, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", str(model), "--data", str(data)]
    cmd += ["--batch", str(batch), "--dropout", str(dropout), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---- the benchmark ----


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden options with which the benchmark runs itself as one variant's child process."""
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    parser.add_argument("--batch", type=int, default=16, help="effective batch: rows per optimizer step (16)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved (default 2)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: demo, large")
    every = ", ".join(VARIANTS + EXTRA_VARIANTS)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {every}")
    parser.add_argument("--work", type=Path, default=None, help="where models and data go (default: a temp dir)")
    parser.add_argument(
        "--dropout", type=float, default=0.0, help="LoRA dropout for every variant (default 0.0, the spec's)"
    )
    parser.add_argument("--seed", type=int, default=42, help="training seed for every variant (default 42)")
    add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.data, args.batch, args.dropout, args.seed)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        models = build_models(work)
        variants = args.variants.split(",")
        print(
            f"torch threads {torch.get_num_threads()}, {args.steps} steps x {args.batch} rows, {args.repeats} repeats, "
            f"LoRA dropout {args.dropout}, seed {args.seed}"
        )
        for name in args.models.split(","):
            rows, lengths = make_rows(models[name], args.steps * args.batch, seed=1)
            data = work / f"data-{name}"
            data.mkdir(parents=True, exist_ok=True)
            (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            tokens = sum(lengths)
            print(
                f"\n== model {name}: {len(rows)} rows, {tokens:,} tokens, lengths {min(lengths)}..{max(lengths)} "
                f"(median {int(statistics.median(lengths))})"
            )
            results: dict[str, list[dict]] = {v: [] for v in variants}
            for _ in range(args.repeats):
                for variant in variants:
                    results[variant].append(run_child(variant, models[name], data, args.batch, args.dropout, args.seed))
            report(results, tokens)


def report(results: dict[str, list[dict]], tokens: int) -> None:
    rate = {v: tokens / statistics.median(r["seconds"] for r in runs) for v, runs in results.items()}
    print(
        f"{'variant':<18}{'tok/s':>10}{'seconds':>9}{'steps':>7}{'padding':>9}{'final loss':>12}{'data loss':>11}"
        f"{'peak RSS':>11}"
    )
    for variant, runs in results.items():
        last = runs[-1]
        seconds = statistics.median(r["seconds"] for r in runs)
        print(
            f"{variant:<18}{rate[variant]:>10,.0f}{seconds:>9.2f}{last['steps']:>7}{100 * last['padding_share']:>8.1f}%"
            f"{last['final_loss']:>12.4f}{last['data_loss']:>11.4f}{max(r['peak_rss_mib'] for r in runs):>8.0f} MiB"
        )
    for variant, runs in results.items():
        if variant.startswith("ours"):
            print(
                f"{variant}: weights {runs[-1]['weights_mib']:,.1f} MiB, peak RSS while training "
                f"{max(r['train_peak_rss_mib'] for r in runs):,.0f} MiB"
            )
    if "ours" not in rate:
        return
    trl = {v: r for v, r in rate.items() if v.startswith("trl")}
    if "trl_default" in trl:
        print(f"ratio vs TRL defaults: {rate['ours'] / trl['trl_default']:.2f}")
    if trl:
        best = max(trl, key=trl.get)
        print(f"ratio vs TRL best: {rate['ours'] / trl[best]:.2f} ({best})")
    print(f"padding: {100 * results['ours'][-1]['padding_share']:.1f}%")


if __name__ == "__main__":
    sys.exit(main())
