"""CUDA training backends side by side: plain peft, peft + Liger, unsloth; bf16 and 4-bit (QLoRA).

A benchmark, not a test: it needs a CUDA GPU, prints numbers and asserts nothing. It builds a random
Llama-shaped model (TinyLlama's shape by default: hidden 2048, 22 layers, GQA 32/4 heads; the demo's
tokenizer), generates mixed-length chat data (rows of 16..1024 tokens, log-uniform, as train_throughput.py),
and trains LoRA r=16 on every linear layer through this package's train stage, once per variant, each in a
process of its own (peak memory is per process), interleaved over repeats:

  peft              transformers + peft, bf16, Liger off (the baseline)
  peft_liger        the same with train.use_liger (Liger's RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)
  unsloth           train.backend unsloth (its patched model and gradient checkpointing), bf16
  peft_4bit         peft with train.lora_load_in_4bit (bitsandbytes NF4), Liger off
  peft_4bit_liger   the spec's defaults on CUDA with peft: 4-bit and Liger
  unsloth_4bit      unsloth with 4-bit weights
  trl_default       TRL SFTTrainer + PEFT in bf16 with its defaults (micro-batch 8, padded), for reference
  trl_padding_free  the same with padding_free=True (TRL's best without flash-attn installed)

Reported per variant (the median over repeats): real tokens/s from metrics.json (tokens trained over the
seconds in the training loop; nothing evaluates), the ratio against `peft`, CUDA max allocated (weights
included), the pre-flight estimate of it, peak RSS, MFU and the mean training loss. MFU counts 6 FLOPs per
parameter per token (embeddings excluded, the LM head included; attention's own FLOPs not counted), over
the dense bf16 peak given by --peak-tflops (H100/H200 SXM datasheet: 989). A LoRA's frozen weights need no
weight gradients, so the work really done is nearer 4 FLOPs per parameter per token: MFU here is the usual,
comparable figure, not the share of the GPU kept busy.

    python bench/cuda_backends.py                        # all variants, 1 repeat
    python bench/cuda_backends.py --variants peft,unsloth --repeats 3 --rows 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import add_child_arguments, bench_config, make_rows, run_trl, save_random_model  # noqa: E402 - the same data and settings as the CPU benchmark

VARIANTS = {
    "peft": {"backend": "peft", "use_liger": False, "lora_load_in_4bit": False},
    "peft_liger": {"backend": "peft", "use_liger": True, "lora_load_in_4bit": False},
    "unsloth": {"backend": "unsloth", "use_liger": False, "lora_load_in_4bit": False},
    "peft_4bit": {"backend": "peft", "use_liger": False, "lora_load_in_4bit": True},
    "peft_4bit_liger": {"backend": "peft", "use_liger": True, "lora_load_in_4bit": True},
    "unsloth_4bit": {"backend": "unsloth", "use_liger": False, "lora_load_in_4bit": True},
    "trl_default": {},
    "trl_padding_free": {},
}
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32}


def build_model(work: Path, layers: int) -> Path:
    from lora_pipeline.demo import build_demo

    demo = build_demo(work / "home").model_dir
    shape = {**SHAPE, "num_hidden_layers": layers, "max_position_embeddings": 4096}
    return save_random_model(work / "llama", "Llama", demo, dtype="bfloat16", **shape)


def matmul_parameters(model: Path) -> int:
    """Parameters that take part in a matmul per token: all but the input embedding."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model)
    head = c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attention + mlp) + c.hidden_size * c.vocab_size


def child(variant: str, model: Path, data: Path, batch: int) -> None:
    import logging

    from lora_pipeline.stages.train import train_adapter

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    if variant.startswith("trl"):
        return trl_child(variant, model, data, batch)
    cfg = bench_config(model, batch, **VARIANTS[variant])
    with tempfile.TemporaryDirectory() as tmp:
        metrics = json.loads((train_adapter(cfg, data, Path(tmp) / "out") / "metrics.json").read_text())
    peak, estimate = metrics["memory"]["peak"], metrics["memory"]["estimate"]
    result = {
        "backend": metrics["backend"],
        "liger": metrics["liger"],
        "padding_free": metrics["padding_free"]["applied"],
        "tokens_per_second": metrics["tokens_per_second"],
        "train_seconds": metrics["train_seconds"],
        "train_loss": metrics["train_loss"],
        "steps": metrics["steps"],
        "padding_share": metrics["batching"]["padding_share"],
        "cuda_max_allocated_gib": (peak["cuda_max_allocated_bytes"] or 0) / 2**30,
        "estimate_gib": estimate["total"] / 2**30,
        "peak_rss_gib": peak["rss_peak_bytes"] / 2**30,  # while training (VmHWM, reset at the start)
    }
    print("RESULT " + json.dumps(result), flush=True)


def trl_child(variant: str, model: Path, data: Path, batch: int) -> None:
    import torch

    from lora_pipeline.training.estimate import kernel_peak_rss

    with tempfile.TemporaryDirectory() as tmp:
        run = run_trl(model, data, batch, Path(tmp) / "out", padding_free=variant == "trl_padding_free", cuda=True)
    result = {
        "backend": "trl",
        "liger": False,
        "padding_free": variant == "trl_padding_free",
        "seconds": run["seconds"],  # tokens/s is computed by the parent, which counted the data's tokens
        "train_loss": run["train_loss"],
        "steps": run["steps"],
        "padding_share": run["padding_share"],
        "cuda_max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "estimate_gib": float("nan"),
        "peak_rss_gib": (kernel_peak_rss() or 0) / 2**30,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(variant: str, model: Path, data: Path, batch: int, log_dir: Path | None) -> dict | None:
    cmd = [sys.executable, __file__, "--child", variant, "--model", str(model), "--data", str(data)]
    proc = subprocess.run([*cmd, "--batch", str(batch)], capture_output=True, text=True)
    if log_dir:
        (log_dir / f"{variant}.log").write_text(proc.stdout + proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-2500:]}", flush=True)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated: {', '.join(VARIANTS)}")
    parser.add_argument("--rows", type=int, default=2048, help="training rows (default 2048)")
    parser.add_argument("--batch", type=int, default=32, help="effective batch: rows per optimizer step (32)")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers (22)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved (default 1)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (989)")
    parser.add_argument("--logs", type=Path, default=None, help="a folder for each run's output")
    add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.data, args.batch)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("cuda_backends.py needs a CUDA GPU")
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_model(work, args.layers)
        rows, lengths = make_rows(model, args.rows, seed=1)
        data = work / "data"
        data.mkdir()
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        flops_per_token = 6 * matmul_parameters(model)
        print(
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model: {args.layers} layers, "
            f"{matmul_parameters(model) / 1e9:.2f}B matmul parameters; {len(rows)} rows, {sum(lengths):,} tokens "
            f"(lengths {min(lengths)}..{max(lengths)}, median {int(statistics.median(lengths))}), "
            f"{args.batch} rows per step",
            flush=True,
        )
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            for variant in variants:
                result = run_child(variant, model, data, args.batch, args.logs)
                if result and "tokens_per_second" not in result:
                    result["tokens_per_second"] = round(sum(lengths) / result["seconds"], 1)
                if result:
                    results[variant].append(result)
                    print(f"{variant}: {json.dumps(result)}", flush=True)
        report(results, flops_per_token, args.peak_tflops)


def report(results: dict[str, list[dict]], flops_per_token: float, peak_tflops: float) -> None:
    rate = {v: statistics.median(r["tokens_per_second"] for r in runs) for v, runs in results.items() if runs}
    print(
        f"\n{'variant':<17}{'ran':<16}{'tok/s':>9}{'vs peft':>9}{'MFU':>7}{'CUDA max':>10}{'estimate':>10}"
        f"{'RSS':>8}{'padding':>9}{'loss':>8}"
    )
    for variant, runs in results.items():
        if not runs:
            print(f"{variant:<17}failed")
            continue
        last = runs[-1]
        ran = last["backend"] + ("+liger" if last["liger"] else "") + ("" if last["padding_free"] else " padded")
        versus = f"{rate[variant] / rate['peft']:.2f}x" if "peft" in rate else "-"
        mfu = rate[variant] * flops_per_token / (peak_tflops * 1e12)
        print(
            f"{variant:<17}{ran:<16}{rate[variant]:>9,.0f}{versus:>9}{100 * mfu:>6.1f}%"
            f"{last['cuda_max_allocated_gib']:>7.1f}GiB{last['estimate_gib']:>7.1f}GiB{last['peak_rss_gib']:>5.1f}GiB"
            f"{100 * last['padding_share']:>8.1f}%{last['train_loss']:>8.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
