"""Eval stage: lm-evaluation-harness on base + adapter (unmerged) and on the base model, side by side.

The adapter is scored as it was trained: when the train stage loaded its base 4-bit or 8-bit (recorded in
train/metrics.json), eval loads the base the same way and hands the loaded model to lm-eval, and the
base model is scored in the same quantization so the two columns compare like with like. An adapter
trained on a quantized base and scored on the full-precision one reads far worse than it is (measured on
a real model: 0.415 vs 0.74). `eval.full_precision` adds the full-precision pair on top.

Writes `eval_results.json`:
  {"tuned": <lm-eval results>, "base": <lm-eval results>,              as trained
   "tuned_full_precision": ..., "base_full_precision": ...,             with eval.full_precision
   "quantization": <train's settings or null>, "chat_template": bool, "comparison": rows}
and, when `log_samples` is on, `samples/<model>_<task>.jsonl` for each of those models.
"""

from __future__ import annotations

import difflib
import functools
import gc
import glob
import importlib.util
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import ConfigError, LoraPipelineError, StageError
from lora_pipeline.files import atomic_dir, read_json, write_json_atomic, write_jsonl
from lora_pipeline.models import first_line, load_base_model, load_tokenizer

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 8  # lm-eval's "auto" probes GPU memory; on CPU it means this fixed size

# HFLM arguments the stage sets itself from the train stage's output or from other options.
PIPELINE_ARGS = {
    "pretrained": "the base model comes from the train stage's adapter",
    "peft": "the adapter comes from the train stage",
    "delta": "the adapter comes from the train stage",
    "tokenizer": "the adapter's tokenizer (and chat template) is used, as in training",
    "use_fast_tokenizer": "the adapter's tokenizer is used as saved by training",
    "batch_size": "set it with eval.batch_size",
    "trust_remote_code": "set it with train.trust_remote_code (eval loads the base as training did)",
}
# from_pretrained options that HFLM passes through (its **kwargs) when it loads the model itself.
FROM_PRETRAINED_ARGS = frozenset(
    {
        "attn_implementation",
        "low_cpu_mem_usage",
        "device_map",
        "max_memory",
        "offload_state_dict",
        "offload_buffers",
        "cache_dir",
        "local_files_only",
        "token",
        "use_safetensors",
        "variant",
    }
)
# HFLM arguments that still act on a model handed to it already loaded (read from HFLM.__init__ in
# lm-eval 0.4.13); the others only shape how HFLM loads a model itself.
RUNTIME_ARGS = frozenset(
    {
        "backend",
        "truncation",
        "logits_cache",
        "max_length",
        "softmax_dtype",
        "mixed_precision_dtype",
        "max_batch_size",
        "add_bos_token",
        "prefix_token_id",
        "think_end_token",
        "enable_thinking",
        "chat_template_args",
    }
)
VLLM_ARGS = frozenset({"gpu_memory_utilization", "tensor_parallel_size", "max_model_len", "data_parallel_size"})


def evaluate_adapter(cfg: EvalConfig, train_dir: Path, out: Path) -> Path:
    """Score base + adapter and the base model on `cfg.tasks`, as trained; write `out/eval_results.json`."""
    train_dir, out = Path(train_dir), Path(out)
    adapter = (train_dir / "adapter").resolve()
    if not (adapter / "adapter_config.json").exists():
        raise StageError(f"no adapter in {adapter}: run the train stage first", field="eval")
    base_ref = read_json(adapter / "adapter_config.json")["base_model_name_or_path"]
    # The train stage records how it loaded the base; an older train output without these keys was
    # trained in full precision without remote code.
    trained = read_json(train_dir / "metrics.json") if (train_dir / "metrics.json").exists() else {}
    quant = trained.get("quantization")
    trust_remote_code = bool(trained.get("trust_remote_code", False))
    label = precision_label(quant)
    if quant and importlib.util.find_spec("bitsandbytes") is None:
        raise StageError(
            f"the adapter was trained on a {label} base; scoring it as trained needs bitsandbytes "
            "(pip install bitsandbytes)",
            field="eval",
        )

    import torch

    logging.getLogger("lm_eval").setLevel(cfg.verbosity)  # lm-eval deprecated its own verbosity arguments
    task_manager = _checked_options(cfg, StageError)
    _build_tasks(task_manager, cfg.tasks)  # a task that cannot be built fails here, before any model loads

    cuda = torch.cuda.is_available()
    batch_size: Any = cfg.batch_size
    if batch_size.startswith("auto") and not cuda:
        batch_size = CPU_AUTO_BATCH
    # Both models are scored through the adapter's tokenizer: the same chat template as in training.
    tokenizer = load_tokenizer(str(adapter), trust_remote_code, field="eval")
    chat = cfg.apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
    scorer = _Scorer(cfg, task_manager, tokenizer, chat, batch_size, "cuda" if cuda else "cpu")

    results: dict[str, Any] = {}
    if quant:
        if _rank() == 0:  # lm-eval cannot shard a model it is handed loaded: under torchrun rank 0 scores it
            results.update(scorer.as_quantized(base_ref, adapter, quant, trust_remote_code))
        if cfg.full_precision:
            full = scorer.full_precision(base_ref, adapter, trust_remote_code, quant)
            results.update({f"{name}_full_precision": res for name, res in full.items()})
    else:
        if cfg.full_precision:
            log.info("eval: training was not quantized, so the scores are full precision already")
        results.update(scorer.full_precision(base_ref, adapter, trust_remote_code, None))
    if _rank() != 0:  # under torchrun, only rank 0 gets lm-eval's results and writes them
        return out

    samples = {name: res.pop("samples", None) or {} for name, res in results.items()}
    comparison = compare(results.get("base"), results["tuned"], label)
    if "tuned_full_precision" in results:
        comparison += compare(results.get("base_full_precision"), results["tuned_full_precision"], "full")
    with atomic_dir(out) as tmp:
        write_json_atomic(
            {**results, "quantization": quant, "chat_template": chat, "comparison": comparison},
            tmp / "eval_results.json",
        )
        for name, per_task in samples.items():
            for task, rows in per_task.items():
                (tmp / "samples").mkdir(exist_ok=True)
                write_jsonl(_jsonable(rows), tmp / "samples" / f"{name}_{task}.jsonl")

    from lora_pipeline.report import format_table

    log.info("eval:\n%s", format_table(comparison))
    return out


def precision_label(quant: dict[str, Any] | None) -> str:
    """How the base was loaded, for tables: "4-bit nf4", "8-bit" or "full"."""
    if not quant:
        return "full"
    if quant.get("bits") == 4:
        return f"4-bit {quant.get('quant_type') or 'nf4'}"
    return f"{quant.get('bits')}-bit"


@dataclass
class _Scorer:
    """What every model of one eval run is scored with: tasks, tokenizer, chat template, batch and device."""

    cfg: EvalConfig
    task_manager: Any
    tokenizer: Any
    chat: bool
    batch_size: Any
    device: str

    def as_quantized(self, base_ref: str, adapter: Path, quant: dict, trust_remote_code: bool) -> dict[str, dict]:
        """Base and base+adapter on the base loaded as in training (bitsandbytes), one load for both."""
        from peft import PeftModel

        runtime = {k: v for k, v in self.cfg.model_args.items() if k in RUNTIME_ARGS}
        load_only = sorted(set(self.cfg.model_args) - set(runtime))
        if load_only:
            log.warning(
                "eval: model_args %s only apply when lm-eval loads the model itself; the %s base is loaded as in "
                "training, so they apply to eval.full_precision scoring only",
                ", ".join(load_only),
                precision_label(quant),
            )
        record = {"pretrained": base_ref, "quantization": quant, **runtime}
        model = load_base_model(base_ref, quant, trust_remote_code, field="train.model")
        results = {}
        # Base first: wrapping the model with the adapter injects the LoRA layers into it in place.
        if self.cfg.compare_base:
            results["base"] = self.score("base", self.hflm(runtime, pretrained=model), record)
        model = PeftModel.from_pretrained(model, str(adapter))
        results["tuned"] = self.score("tuned", self.hflm(runtime, pretrained=model), {**record, "peft": str(adapter)})
        del model
        _free_memory()
        return results

    def full_precision(
        self, base_ref: str, adapter: Path, trust_remote_code: bool, quant: dict | None
    ) -> dict[str, dict]:
        """Base and base+adapter loaded by lm-eval itself, in full precision, with the user's model_args."""
        common = {"pretrained": base_ref, "trust_remote_code": trust_remote_code}
        models = {"tuned": {**common, "peft": str(adapter)}}
        if self.cfg.compare_base:
            models["base"] = common
        results = {}
        for name, args in models.items():
            lm = self.hflm(self.cfg.model_args, device=self.device, **args)
            label = f"{name} full-precision" if quant else name
            results[name] = self.score(label, lm, {**args, **self.cfg.model_args})
            del lm
            _free_memory()
        return {name: res for name, res in results.items() if res is not None}

    def hflm(self, user_args: dict[str, Any], **kwargs: Any) -> Any:
        """lm-eval's hf model from the stage's arguments and the user's model_args (which win, e.g. device).
        A model_args value it rejects is one line naming eval.model_args."""
        from lm_eval.models.huggingface import HFLM

        try:
            return HFLM(**{"tokenizer": self.tokenizer, "batch_size": self.batch_size, **kwargs, **user_args})
        except OSError as exc:
            raise StageError(f"cannot load the base model: {first_line(exc)}", field="train.model") from exc
        except (TypeError, ValueError) as exc:
            if not user_args:
                raise  # nothing the user passed: a bug, keep the traceback
            raise StageError(
                f"lm-eval's hf model rejected {user_args}: {first_line(exc)}", field="eval.model_args"
            ) from exc

    def score(self, name: str, lm: Any, record: dict[str, Any]) -> dict | None:
        """lm-eval's results for one model (None on the non-zero ranks of a torchrun launch)."""
        import lm_eval.evaluator

        log.info("eval: %s model on %s", name, ", ".join(self.cfg.tasks))
        if (
            not sys.stderr.isatty()
        ):  # no terminal: lm-eval's request bars pass disable=False, whatever TQDM_DISABLE says
            for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, method, functools.partial(getattr(lm, method), disable_tqdm=True))
        # lm-eval records `git describe` of the working directory, whatever repository that is, and
        # prints git's "fatal: not a git repository" on every run outside one: skip it.
        with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None):
            return self._simple_evaluate(lm, record)

    def _simple_evaluate(self, lm: Any, record: dict[str, Any]) -> dict | None:
        import lm_eval

        return lm_eval.simple_evaluate(
            model=lm,
            model_args=record,  # only recorded in the results' "config": lm is already built
            tasks=list(self.cfg.tasks),
            task_manager=self.task_manager,
            batch_size=self.batch_size,
            device=self.device,
            limit=None if self.cfg.limit < 0 else self.cfg.limit,
            log_samples=self.cfg.log_samples,
            gen_kwargs=self.cfg.gen_kwargs or None,
            apply_chat_template=self.chat,
        )


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _free_memory() -> None:
    """Drop the last model before the next loads: two 4-bit-and-full-precision pairs need not fit at once."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- option checks: pre-flight (ConfigError) and again at eval time (StageError) ---------------------------


def check_eval_options(cfg: EvalConfig) -> None:
    """Pre-flight, in seconds: include_path, task names, model_args keys and local tasks' data files.

    Raises ConfigError naming the field. The eval stage runs the same checks (as StageError) when it starts.
    """
    _checked_options(cfg, ConfigError)


def _checked_options(cfg: EvalConfig, error: type[LoraPipelineError]) -> Any:
    """The checks of check_eval_options; returns the task manager they built."""
    if cfg.include_path and not Path(cfg.include_path).is_dir():
        raise error(f"not a directory: {cfg.include_path}", field="eval.include_path")
    _check_model_args(cfg.model_args, error)
    task_manager = _task_manager(cfg)
    known = set(task_manager.all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        hint = "" if cfg.include_path else " (local task YAMLs need eval.include_path)"
        raise error(f"unknown lm-eval task(s): {', '.join(unknown)}{hint}", field="eval.tasks")
    _check_local_data(cfg, task_manager, error)
    return task_manager


def _check_model_args(model_args: dict[str, Any], error: type[LoraPipelineError]) -> None:
    """Only keys lm-eval's hf model takes: an unknown one is otherwise a TypeError deep inside from_pretrained."""
    import inspect

    from lm_eval.models.huggingface import HFLM

    hflm_args = set(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
    allowed = (hflm_args | FROM_PRETRAINED_ARGS) - set(PIPELINE_ARGS)
    for key in model_args:
        if key in PIPELINE_ARGS:
            raise error(f"{key!r} cannot be set here: {PIPELINE_ARGS[key]}", field="eval.model_args")
        if key in allowed:
            continue
        if key in VLLM_ARGS:
            why = "a vLLM option; this pipeline evaluates with lm-eval's hf backend"
        else:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            why = f"did you mean {close[0]!r}?" if close else "not an lm-eval hf model argument"
        raise error(
            f"unknown key {key!r} ({why}); it takes HFLM arguments and from_pretrained options such as "
            "dtype, revision, attn_implementation, max_length, device_map, max_memory, low_cpu_mem_usage",
            field="eval.model_args",
        )


def _task_manager(cfg: EvalConfig) -> Any:
    """Index only the local task YAMLs when they hold every task asked for: indexing lm-eval's
    thousands of built-in tasks costs ~8 s on a small CPU."""
    from lm_eval.tasks import TaskManager

    if cfg.include_path:
        local = TaskManager(include_path=cfg.include_path, include_defaults=False)
        if all(t in local.all_tasks for t in cfg.tasks):
            return local
    return TaskManager(include_path=cfg.include_path or None)


def _check_local_data(cfg: EvalConfig, task_manager: Any, error: type[LoraPipelineError]) -> None:
    """The data files named by local task YAMLs exist. lm-eval finds out only when it builds the task, deep in
    `datasets`, and relative paths there resolve against the working directory, not against the YAML."""
    if not cfg.include_path:
        return
    root = Path(cfg.include_path).resolve()
    for name, yaml_path, task_cfg in _local_tasks(task_manager, cfg.tasks, root):
        for path in _data_paths(task_cfg):
            if _found(path):
                continue
            where = f"task {name!r} ({yaml_path}) reads {path}, which does not exist"
            if not Path(path).expanduser().is_absolute():
                where += f" (relative paths in task YAMLs resolve against the working directory, {Path.cwd()})"
            raise error(where, field="eval.include_path")


def _local_tasks(task_manager: Any, names: list[str], root: Path) -> list[tuple[str, Path, dict]]:
    """(name, yaml path, config) of the tasks under `root` that `names` reach, through groups and tags too."""
    found: list[tuple[str, Path, dict]] = []
    todo: list[tuple[str | dict, Path | None]] = [(name, None) for name in names]  # (task, YAML that named it)
    seen: set[str] = set()
    while todo:
        item, parent = todo.pop()
        if isinstance(item, dict):  # a task written inline in a group's YAML
            if parent and root in parent.resolve().parents:
                found.append((str(item.get("task")), parent, item))
            continue
        entry = task_manager.task_index.get(item)
        if entry is None or item in seen:
            continue
        seen.add(item)
        if entry.yaml_path is None:  # a tag: its entry lists the tasks carrying it
            todo += [(task, None) for task in sorted(entry.tags)]
        elif entry.cfg and "group" in entry.cfg:
            children = entry.cfg.get("task") or []
            todo += [(child, entry.yaml_path) for child in (children if isinstance(children, list) else [children])]
        elif entry.cfg and root in Path(entry.yaml_path).resolve().parents:
            found.append((item, entry.yaml_path, entry.cfg))
    return found


def _data_paths(task_cfg: dict) -> list[str]:
    """Local paths a task config makes `datasets` read: data_files entries, and a path-like dataset_path."""
    paths: list[str] = []
    dataset_path = task_cfg.get("dataset_path")
    if isinstance(dataset_path, str) and dataset_path.startswith((".", "/", "~")):
        paths.append(dataset_path)
    data_files = (task_cfg.get("dataset_kwargs") or {}).get("data_files")
    for value in data_files.values() if isinstance(data_files, dict) else [data_files]:
        paths += value if isinstance(value, list) else [value]
    return [p for p in paths if isinstance(p, str) and "://" not in p]


def _found(path: str) -> bool:
    """A file or directory, or a glob pattern that matches one; relative to the working directory, as in datasets."""
    return bool(glob.glob(os.path.expanduser(path), recursive=True))


def _build_tasks(task_manager: Any, tasks: list[str]) -> None:
    """Build the tasks once before any model loads. Whatever fails here (a dataset missing from the offline
    cache, a broken YAML) is about the tasks the user chose, so it is one line, not lm-eval's traceback."""
    try:
        task_manager.load(list(tasks))
    except Exception as exc:
        raise StageError(
            f"cannot build lm-eval task(s) {', '.join(tasks)}: {_reason(exc)}", field="eval.tasks"
        ) from exc


def _reason(exc: BaseException) -> str:
    """The error's first line, plus that of its root cause: `datasets` wraps the telling error (a JSON parse
    error, a missing file) in a generic one."""
    chain = [exc]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    root = chain[-1]
    if root is exc:
        return first_line(exc)
    return f"{first_line(exc)} ({type(root).__name__}: {first_line(root)})"


# --- comparison -----------------------------------------------------------------------------------------


def compare(base: dict | None, tuned: dict, precision: str = "full") -> list[dict]:
    """One row per task, metric and lm-eval filter: tuned vs base value, stderr and difference."""
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
                    "precision": precision,
                    "base": b,
                    "base_stderr": _num(base_metrics.get(stderr_key)),
                    "tuned": value,
                    "tuned_stderr": _num(metrics.get(stderr_key)),
                    "delta": value - b if isinstance(b, (int, float)) else None,
                }
            )
    return rows


def _num(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def _jsonable(rows: list[dict]) -> list[dict]:
    import json

    return [json.loads(json.dumps(r, default=str)) for r in rows]
