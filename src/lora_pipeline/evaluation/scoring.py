"""Scoring base and base + adapter: lm-eval's tasks through its hf or vllm model, and the run's own split
through the same loaded model (transformers), merged into one lm-eval-shaped result per model."""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import StageError
from lora_pipeline.evaluation import split_task
from lora_pipeline.evaluation.backends import HF_RUNTIME_ARGS, hf_gen_kwargs, vllm_model_args, vllm_model_class
from lora_pipeline.evaluation.request_progress import track_requests
from lora_pipeline.evaluation.results import precision_label
from lora_pipeline.models import first_line, load_base_model
from lora_pipeline.redaction import redact_model_args

log = logging.getLogger(__name__)

CPU_AUTO_BATCH = 8  # lm-eval's "auto" probes GPU memory; on CPU it means this fixed size


@dataclass
class Scorer:
    """What every model of one eval run is scored with: tasks, split rows, tokenizer, chat template, batch,
    device and backend."""

    cfg: EvalConfig
    task_manager: Any
    tasks: list[str]  # lm-eval tasks (the run's split apart)
    split_rows: list[dict] | None  # the run's eval split, when the `split` task is asked for
    tokenizer: Any
    chat: bool
    batch_size: Any
    device: str
    backend: str = "hf"

    def as_quantized(self, base_ref: str, adapter: Path, quant: dict, trust_remote_code: bool) -> dict[str, dict]:
        """Base and base+adapter on the base loaded as in training (bitsandbytes), one load for both."""
        from peft import PeftModel

        runtime = {k: v for k, v in self.cfg.model_args.items() if k in HF_RUNTIME_ARGS}
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
        free_memory()
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
            free_memory()
        return {name: res for name, res in results.items() if res is not None}

    def with_vllm(self, base_ref: str, adapter: Path, quant: dict | None, trust_remote_code: bool) -> dict[str, dict]:
        """lm-eval's tasks on one vLLM engine: the tuned model is the base with the adapter as a LoRA request,
        the base model the same engine without it (one load for both). The run's split, if asked for, is
        scored with transformers afterwards, on the base loaded as in training (model_args are vLLM's)."""
        results: dict[str, Any] = {}
        if self.tasks:
            results = self._lm_eval_on_vllm(base_ref, adapter, quant, trust_remote_code)
        if self.split_rows is not None and rank() == 0:
            for name, split in self._split_on_transformers(base_ref, adapter, quant, trust_remote_code).items():
                results[name] = split_task.merge(results.get(name), split)
                results[name].setdefault("config", {"model_args": {"pretrained": base_ref, "quantization": quant}})
        return results

    def _lm_eval_on_vllm(
        self, base_ref: str, adapter: Path, quant: dict | None, trust_remote_code: bool
    ) -> dict[str, dict]:
        args = vllm_model_args(base_ref, adapter, quant, self.cfg.model_args, self.batch_size, trust_remote_code)
        try:
            lm = vllm_model_class()(**args)
        except (TypeError, ValueError) as exc:
            raise StageError(
                f"lm-eval's vllm model rejected {redact_model_args(self.cfg.model_args)}: {first_line(exc)}",
                field="eval.model_args",
            ) from exc
        base_record = {k: v for k, v in args.items() if k not in ("lora_local_path", "max_lora_rank")}
        results = {}
        if self.cfg.compare_base:
            lora, lm.lora_request = lm.lora_request, None
            results["base"] = self.score("base", lm, base_record, split_model=None)
            lm.lora_request = lora
        results["tuned"] = self.score("tuned", lm, args, split_model=None)
        del lm
        free_memory()
        return results

    def _split_on_transformers(
        self, base_ref: str, adapter: Path, quant: dict | None, trust_remote_code: bool
    ) -> dict[str, dict]:
        from peft import PeftModel

        model = load_base_model(base_ref, quant, trust_remote_code, field="train.model")
        out = {}
        if self.cfg.compare_base:
            out["base"] = self.score_split(model)
        out["tuned"] = self.score_split(PeftModel.from_pretrained(model, str(adapter)))
        del model
        free_memory()
        return out

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
                f"lm-eval's hf model rejected {redact_model_args(user_args)}: {first_line(exc)}",
                field="eval.model_args",
            ) from exc

    def score(self, name: str, lm: Any, record: dict[str, Any], split_model: Any = "lm") -> dict | None:
        """One model's results (None on the non-zero ranks of a torchrun launch): lm-eval's tasks, and the
        run's split scored on `split_model` (by default the transformers model inside the hf `lm`)."""
        log.info("eval: %s model on %s", name, ", ".join(self.cfg.tasks))
        record = redact_model_args(record)  # lm-eval writes it into eval_results.json's "config"
        results = None
        if self.tasks:
            results = self._lm_eval(lm, record, name)
            if results is None:
                return None
        elif rank() != 0:
            return None
        if self.split_rows is not None and split_model is not None:
            split = self.score_split(lm.model if split_model == "lm" else split_model)
            results = split_task.merge(results, split)
            results.setdefault("config", {"model_args": record, "gen_kwargs": self.cfg.gen_kwargs or None})
        return results

    def score_split(self, model: Any) -> dict:
        batch = int(self.batch_size) if str(self.batch_size).isdigit() else CPU_AUTO_BATCH
        max_tokens = split_task.max_new_tokens(self.cfg.gen_kwargs)
        return split_task.score_split(model, self.tokenizer, self.split_rows, batch, max_tokens, self.cfg.log_samples)

    def _lm_eval(self, lm: Any, record: dict[str, Any], name: str) -> dict | None:
        import lm_eval
        import lm_eval.evaluator

        track_requests(lm, name)  # our progress lines instead of lm-eval's bars, with or without a terminal
        gen_kwargs = hf_gen_kwargs(self.cfg.gen_kwargs) if self.backend == "hf" else dict(self.cfg.gen_kwargs)
        # lm-eval records `git describe` of the working directory, whatever repository that is, and
        # prints git's "fatal: not a git repository" on every run outside one: skip it.
        with (
            mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None),
            mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: results.update(ENV_INFO.get())),
        ):
            return lm_eval.simple_evaluate(
                model=lm,
                model_args=record,  # only recorded in the results' "config": lm is already built
                tasks=list(self.tasks),
                task_manager=self.task_manager,
                batch_size=self.batch_size,
                device=self.device,
                limit=None if self.cfg.limit < 0 else self.cfg.limit,
                log_samples=self.cfg.log_samples,
                gen_kwargs=gen_kwargs or None,
                apply_chat_template=self.chat,
            )


class EnvironmentInfo:
    """lm-eval's environment fields (torch's environment report, versions) for the results, collected once.

    lm-eval adds them to every model's results, and torch's report runs about 20 subprocesses (`pip list` among
    them): 0.55 s per model scored, a third of the demo's eval stage. Collected once per process, in a thread
    started before the first model loads, so that the subprocesses run while the model loads and scores."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._info: dict[str, Any] | None = None

    def start(self) -> None:
        if self._thread is None:
            # imported by the caller: a failing import is an error here, not a silent one in the thread
            from lm_eval.loggers.utils import add_env_info

            self._thread = threading.Thread(target=self._collect, args=(add_env_info,), name="lm-eval-env-info")
            self._thread.daemon = True
            self._thread.start()

    def _collect(self, add_env_info: Any) -> None:
        info: dict[str, Any] = {}
        try:
            add_env_info(info)
        except Exception as exc:  # informational fields: a failure to collect them never fails the eval
            info = {"pretty_env_info": f"not collected: {exc}"}
        self._info = info

    def get(self) -> dict[str, Any]:
        self.start()
        assert self._thread is not None
        self._thread.join()
        return dict(self._info or {})


ENV_INFO = EnvironmentInfo()


def start_env_info() -> None:
    """Start collecting lm-eval's environment fields (see `EnvironmentInfo`) while the models load and score."""
    ENV_INFO.start()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def free_memory() -> None:
    """Drop the last model before the next loads: two 4-bit-and-full-precision pairs need not fit at once."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
