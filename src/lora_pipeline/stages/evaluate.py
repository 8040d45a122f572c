"""Eval stage: lm-evaluation-harness (hf or vllm backend) and the run's own held-out split, on base + adapter
(unmerged) and on the base model, side by side.

The adapter is scored as it was trained: when the train stage loaded its base 4-bit or 8-bit (recorded in
train/metrics.json), eval loads the base the same way and hands the loaded model to lm-eval, and the
base model is scored in the same quantization so the two columns compare like with like. An adapter
trained on a quantized base and scored on the full-precision one reads far worse than it is (measured on
a real model: 0.415 vs 0.74). `eval.full_precision` adds the full-precision pair on top.

Writes `eval_results.json`:
  {"tuned": <lm-eval results>, "base": <lm-eval results>,              as trained
   "tuned_full_precision": ..., "base_full_precision": ...,             with eval.full_precision
   "backend": "hf" | "vllm", "quantization": <train's settings or null>, "chat_template": bool,
   "comparison": rows}
and, when `log_samples` is on, `samples/<model>_<task>.jsonl` for each of those models. The `split` task's
metrics sit in each results' "results" under the task name `split`, as lm-eval's tasks' do.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import StageError
from lora_pipeline.evaluation import split_task
from lora_pipeline.evaluation.checks import SPLIT_TASK, check_eval_options, checked_options, lm_eval_tasks
from lora_pipeline.evaluation.results import compare, eval_scope, jsonable, precision_label, replaced_line
from lora_pipeline.evaluation.scoring import CPU_AUTO_BATCH, Scorer, rank, start_env_info
from lora_pipeline.files import atomic_dir, read_json, write_json_atomic, write_jsonl
from lora_pipeline.logs import set_library_levels
from lora_pipeline.models import adapter_base, load_tokenizer, recorded_base
from lora_pipeline.redaction import redact_record
from lora_pipeline.stages.outputs import ADAPTER, EVAL_RESULTS, EVAL_ROWS, METRICS, REGISTRATION

__all__ = ["check_eval_options", "compare", "evaluate_adapter", "find_eval_split", "precision_label"]

log = logging.getLogger(__name__)


def evaluate_adapter(cfg: EvalConfig, train_dir: Path, out: Path) -> Path:
    """Score base + adapter and the base model on `cfg.tasks`, as trained; write `out/eval_results.json`."""
    train_dir, out = Path(train_dir), Path(out)
    adapter = (train_dir / ADAPTER).resolve()
    if not (adapter / "adapter_config.json").exists():
        raise StageError(f"no adapter in {adapter}: run the train stage first", field="eval")
    base_ref = adapter_base(adapter, field="eval")
    # The train stage records how it loaded the base; an older train output without these keys was
    # trained in full precision without remote code.
    trained = read_json(train_dir / METRICS) if (train_dir / METRICS).exists() else {}
    quant = trained.get("quantization")
    trust_remote_code = bool(trained.get("trust_remote_code", False))
    base_ref = recorded_base(base_ref, trained.get("base_model_uri"))
    label = precision_label(quant)
    if quant and importlib.util.find_spec("bitsandbytes") is None:
        raise StageError(
            f"the adapter was trained on a {label} base; scoring it as trained needs bitsandbytes "
            "(pip install bitsandbytes)",
            field="eval",
        )

    import torch

    set_library_levels(cfg.verbosity)  # lm-eval's INFO lines only at DEBUG (it deprecated its own verbosity)
    backend, task_manager = checked_options(cfg, StageError)  # builds the tasks, before any model loads
    tasks = lm_eval_tasks(cfg.tasks)
    split_rows = None
    if SPLIT_TASK in cfg.tasks:
        split_rows = split_task.load_rows(find_eval_split(train_dir, trained), cfg.limit)

    cuda = torch.cuda.is_available()
    batch_size: Any = cfg.batch_size
    if batch_size.startswith("auto") and not cuda:
        batch_size = CPU_AUTO_BATCH
    # Both models are scored through the adapter's tokenizer: the same chat template as in training.
    tokenizer = load_tokenizer(str(adapter), trust_remote_code, field="eval")
    chat = cfg.apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
    device = "cuda" if cuda else "cpu"
    scorer = Scorer(cfg, task_manager, tasks, split_rows, tokenizer, chat, batch_size, device, backend)
    if tasks:
        start_env_info()
    log.info("eval: %s backend", backend)
    results = _score(scorer, cfg, backend, base_ref, adapter, quant, trust_remote_code)
    if rank() != 0:  # under torchrun, only rank 0 gets lm-eval's results and writes them
        return out
    samples = {name: res.pop("samples", None) or {} for name, res in results.items()}
    comparison = compare(results.get("base"), results["tuned"], label)
    if "tuned_full_precision" in results:
        comparison += compare(results.get("base_full_precision"), results["tuned_full_precision"], "full")
    record = {**results, "backend": backend, "quantization": quant, "chat_template": chat, "comparison": comparison}
    _write_results(cfg, out, record, samples)
    return out


def find_eval_split(train_dir: Path, trained: dict[str, Any]) -> Path:
    """The dataset stage's eval.jsonl for the `split` task, through the train output: the copy beside the
    adapter, else in the dataset directory train's metrics.json names."""
    candidates = [train_dir / EVAL_ROWS]
    if trained.get("dataset_dir"):
        candidates.append(Path(trained["dataset_dir"]) / EVAL_ROWS)
    for path in candidates:
        if path.is_file():
            return path
    raise StageError(
        f"task {SPLIT_TASK!r} scores the dataset stage's {EVAL_ROWS}, which is not in "
        f"{', '.join(map(str, candidates))}",
        field="eval.tasks",
    )


def _score(
    scorer: Scorer, cfg: EvalConfig, backend: str, base_ref: str, adapter: Path, quant: Any, trust_remote_code: bool
) -> dict[str, Any]:
    """lm-eval's results per model ("tuned", "base", and "..._full_precision" with eval.full_precision)."""
    results: dict[str, Any] = {}
    if backend == "vllm":
        results.update(scorer.with_vllm(base_ref, adapter, quant, trust_remote_code))
    elif quant:
        if rank() == 0:  # lm-eval cannot shard a model it is handed loaded: under torchrun rank 0 scores it
            results.update(scorer.as_quantized(base_ref, adapter, quant, trust_remote_code))
        if cfg.full_precision:
            full = scorer.full_precision(base_ref, adapter, trust_remote_code, quant)
            results.update({f"{name}_full_precision": res for name, res in full.items()})
    else:
        if cfg.full_precision:
            log.info("eval: training was not quantized, so the scores are full precision already")
        results.update(scorer.full_precision(base_ref, adapter, trust_remote_code, None))
    return results


def _write_results(cfg: EvalConfig, out: Path, record: dict[str, Any], samples: dict[str, Any]) -> None:
    """eval_results.json with its scope and what it replaces, and with eval.log_samples each model's samples."""
    scope = eval_scope(cfg.tasks, cfg.limit)
    replaced = _replaced(out, scope)
    if replaced:  # a quick look (a limit, fewer tasks) never replaces a fuller result silently
        record["replaced"] = replaced
    with atomic_dir(out) as tmp:
        write_json_atomic(redact_record({**record, "scope": scope}), tmp / EVAL_RESULTS)
        if cfg.log_samples:
            for name, per_task in samples.items():
                for task, rows in per_task.items():
                    (tmp / "samples").mkdir(exist_ok=True)
                    write_jsonl(jsonable(rows), tmp / "samples" / f"{name}_{task}.jsonl")

    if replaced:
        log.warning("eval: %s", replaced["line"])


def _replaced(out: Path, scope: dict[str, Any]) -> dict[str, Any] | None:
    """What a narrower eval replaces in `out`: the line that says so, and the earlier scope and table (kept in
    the new record). A registered version's scores are the earlier ones until it is registered again."""
    previous = out / EVAL_RESULTS
    if not previous.is_file():
        return None
    old = read_json(previous)
    line = replaced_line(old, scope)
    if line is None:
        return None
    registration = out.parent / "register" / REGISTRATION  # a run directory's
    if registration.is_file():
        record = read_json(registration)
        if record.get("status") in ("registered", "exists"):
            line += f"; the registered {record['model_name']} {record['version']} keeps the earlier scores"
    return {"line": line, "scope": old.get("scope"), "comparison": old.get("comparison")}
