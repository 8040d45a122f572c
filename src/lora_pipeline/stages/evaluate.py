"""Eval stage: lm-evaluation-harness on base + adapter (unmerged) and on the base model, side by side.

Writes `eval_results.json` ({"tuned": <lm-eval results>, "base": <lm-eval results>, "comparison": rows})
and, when `log_samples` is on, `samples/<model>_<task>.jsonl`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import StageError
from lora_pipeline.files import atomic_dir, read_json, write_json_atomic, write_jsonl

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 8  # lm-eval's "auto" probes GPU memory; on CPU it means this fixed size


def evaluate_adapter(cfg: EvalConfig, train_dir: Path, out: Path, trust_remote_code: bool = False) -> Path:
    adapter = Path(train_dir) / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise StageError(f"no adapter in {adapter}: run the train stage first", field="eval")
    base_model = read_json(adapter / "adapter_config.json")["base_model_name_or_path"]

    import lm_eval
    import torch

    logging.getLogger("lm_eval").setLevel(cfg.verbosity)  # lm-eval deprecated its own verbosity arguments
    task_manager = _task_manager(cfg)
    missing = [t for t in cfg.tasks if t not in task_manager.all_tasks]
    if missing:
        raise StageError(f"unknown lm-eval task(s): {', '.join(missing)}", field="eval.tasks")

    cuda = torch.cuda.is_available()
    batch_size: Any = cfg.batch_size
    if batch_size.startswith("auto") and not cuda:
        batch_size = CPU_AUTO_BATCH
    chat = cfg.apply_chat_template and _has_chat_template(adapter)
    # Both models are scored through the adapter's tokenizer: the same chat template as in training.
    common = {"pretrained": base_model, "tokenizer": str(adapter.resolve()), "trust_remote_code": trust_remote_code}
    models = {"tuned": {**common, "peft": str(adapter.resolve())}}
    if cfg.compare_base:
        models["base"] = dict(common)

    results: dict[str, Any] = {}
    samples: dict[str, dict] = {}
    for name, model_args in models.items():
        log.info("eval: %s model on %s", name, ", ".join(cfg.tasks))
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args={**model_args, **cfg.model_args},
            tasks=list(cfg.tasks),
            task_manager=task_manager,
            batch_size=batch_size,
            device="cuda" if cuda else "cpu",
            limit=None if cfg.limit < 0 else cfg.limit,
            log_samples=cfg.log_samples,
            gen_kwargs=cfg.gen_kwargs or None,
            apply_chat_template=chat,
        )
        if res is None:  # only non-zero ranks get None under torchrun
            return out
        samples[name] = res.pop("samples", None) or {}
        results[name] = res

    comparison = compare(results.get("base"), results["tuned"])
    with atomic_dir(out) as tmp:
        write_json_atomic({**results, "comparison": comparison, "chat_template": chat}, tmp / "eval_results.json")
        for name, per_task in samples.items():
            for task, rows in per_task.items():
                (tmp / "samples").mkdir(exist_ok=True)
                write_jsonl(_jsonable(rows), tmp / "samples" / f"{name}_{task}.jsonl")
    log.info("eval:\n%s", format_table(comparison))
    return out


def _task_manager(cfg: EvalConfig) -> Any:
    """Index only the local task YAMLs when they hold every task asked for: indexing lm-eval's
    thousands of built-in tasks costs ~8 s on a small CPU."""
    from lm_eval.tasks import TaskManager

    if cfg.include_path:
        local = TaskManager(include_path=cfg.include_path, include_defaults=False)
        if all(t in local.all_tasks for t in cfg.tasks):
            return local
    return TaskManager(include_path=cfg.include_path or None)


def compare(base: dict | None, tuned: dict) -> list[dict]:
    """One row per task and metric: tuned vs base value, stderr and difference."""
    rows = []
    for task, metrics in tuned["results"].items():
        base_metrics = (base or {}).get("results", {}).get(task, {})
        for key, value in metrics.items():
            # lm-eval keys metrics as "metric,filter"; bare keys (alias, sample_len) are bookkeeping.
            if not isinstance(value, (int, float)) or "," not in key or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            stderr_key = f"{metric}_stderr,{filt}"
            b = base_metrics.get(key)
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "base": b,
                    "base_stderr": _num(base_metrics.get(stderr_key)),
                    "tuned": value,
                    "tuned_stderr": _num(metrics.get(stderr_key)),
                    "delta": value - b if isinstance(b, (int, float)) else None,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{'task':<24} {'metric':<10} {'base':>8} {'tuned':>8} {'delta':>8}"]
    for r in rows:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
        lines.append(f"{r['task']:<24} {r['metric']:<10} {cell(r['base']):>8} {cell(r['tuned']):>8} {delta:>8}")
    return "\n".join(lines)


def _has_chat_template(adapter: Path) -> bool:
    from transformers import AutoTokenizer

    return bool(getattr(AutoTokenizer.from_pretrained(adapter), "chat_template", None))


def _num(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _jsonable(rows: list[dict]) -> list[dict]:
    import json

    return [json.loads(json.dumps(r, default=str)) for r in rows]
