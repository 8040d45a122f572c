"""Eval stage: lm-eval on base and base+adapter side by side, offline, on the demo task.

A QLoRA adapter is scored on the 4-bit base it was trained on; the option checks fail in one line naming
the field, both before any stage runs (ConfigError) and when the eval stage starts (StageError).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import train_config
from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import ConfigError, StageError
from lora_pipeline.files import read_json, read_jsonl
from lora_pipeline.stages.evaluate import check_eval_options, compare, evaluate_adapter, precision_label
from lora_pipeline.stages.train import train_adapter


@pytest.fixture(scope="module")
def train_dir(demo_assets, demo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evalrun") / "train"
    cfg = train_config(demo_assets.model_dir, effective_batch_size=16, micro_batch_size=16)
    return train_adapter(cfg, demo_dataset, out)


@pytest.fixture(scope="module")
def qlora_train_dir(demo_assets, demo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlorarun") / "train"
    cfg = train_config(demo_assets.model_dir, effective_batch_size=16, micro_batch_size=16, lora_load_in_4bit=True)
    return train_adapter(cfg, demo_dataset, out)


@pytest.fixture
def scored_models(monkeypatch) -> list[dict]:
    """What each lm-eval call scored: the model_args the stage recorded, and the model's layers at that moment
    (the stage injects LoRA into the base it scored before, so the layers are looked at right away)."""
    import bitsandbytes as bnb
    import lm_eval

    seen: list[dict] = []
    real = lm_eval.simple_evaluate

    def spy(*args, **kwargs):
        modules = list(kwargs["model"].model.named_modules())
        seen.append(
            {
                "model_args": kwargs["model_args"],
                "linear_4bit": any(isinstance(m, bnb.nn.Linear4bit) for _, m in modules),
                "lora": any("lora_A" in name for name, _ in modules),
            }
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    return seen


def eval_config(demo_assets, **overrides) -> EvalConfig:
    values = dict(tasks=[demo_assets.task_name], include_path=str(demo_assets.task_dir), limit=20, batch_size="8")
    values.update(overrides)
    return EvalConfig(**values)


def loglikelihoods(samples_file: Path) -> list[float]:
    return [resp[0] for row in read_jsonl(samples_file) for resp in row["filtered_resps"]]


def write_task(directory: Path, name: str, data_file: str) -> Path:
    """A local multiple-choice task in the demo's shape, reading `data_file` as written."""
    directory.mkdir(parents=True, exist_ok=True)
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": ["a", "b"],
        "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}],
    }
    (directory / f"{name}.yaml").write_text(json.dumps(task))  # JSON is YAML
    return directory


# --- scoring ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_base_and_tuned_side_by_side(demo_assets, train_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import torch.utils.collect_env

    from lora_pipeline.evaluation import scoring

    collected = []
    report = torch.utils.collect_env.get_pretty_env_info
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: collected.append(1) or report())
    monkeypatch.setattr(scoring, "ENV_INFO", scoring.EnvironmentInfo())
    out = evaluate_adapter(eval_config(demo_assets), train_dir, tmp_path / "eval")
    results = read_json(out / "eval_results.json")
    # lm-eval's environment fields are in both models' results, collected once (torch's report runs ~20 processes)
    assert len(collected) == 1
    for field in ("pretty_env_info", "transformers_version", "lm_eval_version"):
        assert results["tuned"][field] == results["base"][field] and results["base"][field]
    assert "PyTorch version" in results["base"]["pretty_env_info"]
    task = demo_assets.task_name
    assert results["tuned"]["results"][task]["acc,none"] >= 0
    assert results["base"]["results"][task]["acc,none"] >= 0
    assert results["tuned"]["config"]["model_args"]["peft"].endswith("adapter")
    assert "peft" not in results["base"]["config"]["model_args"]
    assert results["quantization"] is None
    acc = next(r for r in results["comparison"] if r["metric"] == "acc")
    assert (acc["filter"], acc["precision"]) == ("none", "full")
    assert acc["delta"] == pytest.approx(acc["tuned"] - acc["base"])
    assert acc["tuned_stderr"] is not None
    assert results["chat_template"] is True
    # log_samples defaults to on: one JSONL per model and task, 20 rows each (limit)
    for name in ("base", "tuned"):
        lines = (out / "samples" / f"{name}_{task}.jsonl").read_text().splitlines()
        assert len(lines) == 20
    # The adapter changed the model: the same requests get different log-likelihoods.
    samples = out / "samples"
    assert loglikelihoods(samples / f"tuned_{task}.jsonl") != loglikelihoods(samples / f"base_{task}.jsonl")


@pytest.mark.integration
def test_compare_base_off_no_samples_and_nothing_extra_without_quantization(
    demo_assets, train_dir: Path, tmp_path: Path, scored_models: list[dict]
) -> None:
    cfg = eval_config(demo_assets, compare_base=False, log_samples=False, limit=5, full_precision=True)
    results = read_json(evaluate_adapter(cfg, train_dir, tmp_path / "eval") / "eval_results.json")
    assert "base" not in results and results["comparison"][0]["base"] is None
    assert not (tmp_path / "eval" / "samples").exists()
    # Trained in full precision: the as-trained scores are the full-precision ones, nothing is scored twice.
    assert "tuned_full_precision" not in results and len(scored_models) == 1


@pytest.mark.integration
def test_qlora_adapter_is_scored_on_its_4bit_base(
    demo_assets, qlora_train_dir: Path, tmp_path: Path, scored_models: list[dict], caplog
) -> None:
    quant = read_json(qlora_train_dir / "metrics.json")["quantization"]
    assert quant["bits"] == 4
    # max_length acts on a loaded model; low_cpu_mem_usage only on lm-eval's own loading, so it is left out.
    cfg = eval_config(demo_assets, limit=10, model_args={"max_length": 96, "low_cpu_mem_usage": True})
    out = evaluate_adapter(cfg, qlora_train_dir, tmp_path / "eval")
    results = read_json(out / "eval_results.json")
    assert results["quantization"] == quant
    assert results["tuned"]["config"]["model_args"] == {
        "pretrained": read_json(qlora_train_dir / "adapter" / "adapter_config.json")["base_model_name_or_path"],
        "quantization": quant,
        "max_length": 96,
        "peft": str((qlora_train_dir / "adapter").resolve()),
    }
    assert "low_cpu_mem_usage" in caplog.text and "eval.full_precision" in caplog.text
    assert "tuned_full_precision" not in results and "base_full_precision" not in results
    assert {r["precision"] for r in results["comparison"]} == {"4-bit nf4"}
    # Both models lm-eval scored have bitsandbytes 4-bit layers; only the tuned one has the LoRA layers.
    by_role = {"peft" in s["model_args"]: s for s in scored_models}
    assert len(scored_models) == 2 and set(by_role) == {True, False}
    assert by_role[True]["linear_4bit"] and by_role[True]["lora"]
    assert by_role[False]["linear_4bit"] and not by_role[False]["lora"]

    # The recorded scores are those of the adapter on a 4-bit base loaded by hand, not on the fp32 base. Batched
    # 4-bit matmuls (bf16 compute) differ a little from one-row ones, so compare the mean distances.
    samples = out / "samples" / f"tuned_{demo_assets.task_name}.jsonl"
    manual_4bit = _manual_loglikelihoods(qlora_train_dir, quant, samples)
    manual_fp32 = _manual_loglikelihoods(qlora_train_dir, None, samples)
    recorded = loglikelihoods(samples)[: len(manual_4bit)]
    to_4bit, to_fp32 = _mean_distance(recorded, manual_4bit), _mean_distance(recorded, manual_fp32)
    assert to_4bit < 0.3 and to_4bit < 0.1 * to_fp32, (to_4bit, to_fp32)


def _mean_distance(a: list[float], b: list[float]) -> float:
    assert a
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def _manual_loglikelihoods(train_dir: Path, quant: dict | None, samples_file: Path, rows: int = 2) -> list[float]:
    """Sum of the continuation's token log-probs, with plain torch, for the first requests of a samples file."""
    import torch
    from peft import PeftModel

    from lora_pipeline.models import load_base_model, load_tokenizer

    adapter = train_dir / "adapter"
    base_ref = read_json(adapter / "adapter_config.json")["base_model_name_or_path"]
    model = PeftModel.from_pretrained(load_base_model(base_ref, quant), adapter).eval()
    tokenizer = load_tokenizer(str(adapter))
    out = []
    for row in read_jsonl(samples_file)[:rows]:
        for context, continuation in row["arguments"]:
            # As lm-eval splits it: trailing whitespace moves from the context to the continuation, the whole
            # string is encoded once, and the continuation is the tokens after the context's.
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped) :] + continuation
            whole = tokenizer.encode(context + continuation)
            n_context = len(tokenizer.encode(context))
            with torch.no_grad():
                logits = model(torch.tensor([whole[:-1]])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            out.append(sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole))))
    return out


@pytest.mark.integration
def test_full_precision_adds_the_full_precision_pair(
    demo_assets, qlora_train_dir: Path, tmp_path: Path, scored_models: list[dict]
) -> None:
    from lora_pipeline.evaluation.results import format_table

    out = evaluate_adapter(eval_config(demo_assets, limit=10, full_precision=True), qlora_train_dir, tmp_path / "eval")
    results = read_json(out / "eval_results.json")
    task = demo_assets.task_name
    for name in ("tuned", "base", "tuned_full_precision", "base_full_precision"):
        assert results[name]["results"][task]["acc,none"] >= 0
        assert len((out / "samples" / f"{name}_{task}.jsonl").read_text().splitlines()) == 10
    # Four models scored: two on the 4-bit base, two on the full-precision one; the adapter on one of each.
    assert sorted((s["linear_4bit"], s["lora"]) for s in scored_models) == [
        (False, False),
        (False, True),
        (True, False),
        (True, True),
    ]
    rows = results["comparison"]
    assert [r["precision"] for r in rows] == ["4-bit nf4", "full"]
    full = rows[1]
    assert full["tuned"] == results["tuned_full_precision"]["results"][task]["acc,none"]
    assert full["base"] == results["base_full_precision"]["results"][task]["acc,none"]
    # Quantization changes the model: the same requests score differently on the two bases.
    samples = out / "samples"
    full_samples = samples / f"tuned_full_precision_{task}.jsonl"
    assert loglikelihoods(samples / f"tuned_{task}.jsonl") != loglikelihoods(full_samples)
    # ...and the full-precision pair is exactly the adapter on the fp32 base.
    manual_fp32 = _manual_loglikelihoods(qlora_train_dir, None, full_samples)
    assert loglikelihoods(full_samples)[: len(manual_fp32)] == pytest.approx(manual_fp32, abs=1e-4)
    table = format_table(rows)
    assert "precision" in table.splitlines()[0] and "4-bit nf4" in table and " full " in table


def test_environment_fields_that_fail_to_collect_do_not_fail_the_eval(monkeypatch) -> None:
    import lm_eval.loggers.utils

    from lora_pipeline.evaluation.scoring import EnvironmentInfo

    def broken(info: dict) -> None:
        raise RuntimeError("no pip here")

    monkeypatch.setattr(lm_eval.loggers.utils, "add_env_info", broken)
    info = EnvironmentInfo()
    assert info.get() == {"pretty_env_info": "not collected: no pip here"}
    assert info.get() == info.get()  # collected once; each caller gets its own copy


def test_precision_labels() -> None:
    assert precision_label(None) == "full"
    assert precision_label({"bits": 4, "quant_type": "fp4", "compute_dtype": "bfloat16", "double_quant": True}) == (
        "4-bit fp4"
    )
    assert precision_label({"bits": 8}) == "8-bit"


@pytest.mark.integration
def test_missing_bitsandbytes_at_eval_is_one_line(demo_assets, qlora_train_dir: Path, tmp_path: Path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(StageError, match="4-bit nf4 base.*bitsandbytes"):
        evaluate_adapter(eval_config(demo_assets), qlora_train_dir, tmp_path / "eval")


def test_missing_adapter(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="run the train stage first"):
        evaluate_adapter(EvalConfig(), tmp_path, tmp_path / "eval")


def test_compare_rows_name_filter_and_precision() -> None:
    base = {"results": {"t": {"acc,none": 0.25, "acc_stderr,none": 0.02, "alias": "t"}}}
    tuned = {"results": {"t": {"acc,none": 0.75, "acc_stderr,none": 0.03, "alias": "t"}}}
    rows = compare(base, tuned, "4-bit nf4")
    assert rows == [
        {
            "task": "t",
            "metric": "acc",
            "filter": "none",
            "precision": "4-bit nf4",
            "base": 0.25,
            "base_stderr": 0.02,
            "tuned": 0.75,
            "tuned_stderr": 0.03,
            "delta": 0.5,
        }
    ]
    gsm = {"results": {"g": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.4}}}
    assert [(r["filter"], r["base"]) for r in compare(None, gsm)] == [
        ("strict-match", None),
        ("flexible-extract", None),
    ]


# --- option checks ---------------------------------------------------------------------------------------


def test_check_include_path_must_be_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a directory") as err:
        check_eval_options(EvalConfig(tasks=["t"], include_path=str(tmp_path / "nowhere")))
    assert err.value.field == "eval.include_path"


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"dtpye": "bfloat16"}, "'dtpye'.*did you mean 'dtype'"),
        ({"gpu_memory_utilization": 0.9}, "option of the vllm backend only"),
        ({"trust_remote_code": True}, "train.trust_remote_code"),
        ({"pretrained": "other/model"}, "train stage"),
    ],
)
def test_check_model_args_keys(tmp_path: Path, model_args: dict, message: str) -> None:
    tasks = write_task(tmp_path / "tasks", "local_task", str(tmp_path / "data.jsonl"))
    (tmp_path / "data.jsonl").write_text("")
    cfg = EvalConfig(tasks=["local_task"], include_path=str(tasks), model_args=model_args)
    with pytest.raises(ConfigError, match=message) as err:
        check_eval_options(cfg)
    assert err.value.field == "eval.model_args"


def test_check_accepts_hf_and_from_pretrained_model_args(tmp_path: Path) -> None:
    tasks = write_task(tmp_path / "tasks", "local_task", str(tmp_path / "data.jsonl"))
    # pre-flight builds the task: one row to build it from
    (tmp_path / "data.jsonl").write_text('{"question": "q", "label": 0}\n')
    model_args = {"dtype": "bfloat16", "revision": "main", "attn_implementation": "sdpa", "max_length": 512}
    check_eval_options(EvalConfig(tasks=["local_task"], include_path=str(tasks), model_args=model_args))


def test_check_relative_data_files_name_task_path_and_working_directory(tmp_path: Path, monkeypatch) -> None:
    # The data file sits beside the YAML, but datasets resolves a relative path against the working directory.
    tasks = write_task(tmp_path / "tasks", "local_task", "data/test.jsonl")
    (tasks / "data").mkdir()
    (tasks / "data" / "test.jsonl").write_text('{"question": "q", "label": 0}\n')
    monkeypatch.chdir(tmp_path)
    cfg = EvalConfig(tasks=["local_task"], include_path=str(tasks))
    with pytest.raises(ConfigError, match=r"'local_task'.*data/test\.jsonl.*working directory") as err:
        check_eval_options(cfg)
    assert err.value.field == "eval.include_path"
    monkeypatch.chdir(tasks)  # from where the relative path does resolve, the same config passes
    check_eval_options(cfg)


def test_check_absolute_data_files_missing(tmp_path: Path) -> None:
    tasks = write_task(tmp_path / "tasks", "local_task", str(tmp_path / "gone.jsonl"))
    with pytest.raises(ConfigError, match="gone.jsonl") as err:
        check_eval_options(EvalConfig(tasks=["local_task"], include_path=str(tasks)))
    assert err.value.field == "eval.include_path" and "working directory" not in str(err.value)


@pytest.mark.integration  # an unknown name makes lm-eval index its thousands of built-in tasks (~8 s)
def test_check_unknown_task_lists_the_unknown_names(demo_assets) -> None:
    cfg = eval_config(demo_assets, tasks=[demo_assets.task_name, "no_such_task", "nor_this"])
    with pytest.raises(ConfigError, match="unknown lm-eval task.*no_such_task, nor_this") as err:
        check_eval_options(cfg)
    assert err.value.field == "eval.tasks" and demo_assets.task_name not in str(err.value)


# --- the same failures at eval time: one StageError line, nothing written ----------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"tasks": ["no_such_task"]}, "eval.tasks"),
        ({"model_args": {"no_such_arg": 1}}, "eval.model_args"),
        ({"model_args": {"attn_implementation": "no_such_attention"}}, "eval.model_args"),  # a bad value
    ],
)
def test_eval_time_failures_are_one_stage_error(
    demo_assets, train_dir: Path, tmp_path: Path, overrides: dict, field: str
) -> None:
    with pytest.raises(StageError) as err:
        evaluate_adapter(eval_config(demo_assets, **overrides), train_dir, tmp_path / "eval")
    assert err.value.field == field and "\n" not in str(err.value)
    assert not (tmp_path / "eval").exists()


@pytest.mark.integration
def test_eval_time_task_data_failures_are_one_stage_error(train_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    tasks = write_task(tmp_path / "tasks", "relative_task", "missing/test.jsonl")
    with pytest.raises(StageError, match="'relative_task'.*working directory") as err:
        evaluate_adapter(EvalConfig(tasks=["relative_task"], include_path=str(tasks)), train_dir, tmp_path / "eval")
    assert err.value.field == "eval.include_path"
    # A data file that exists but that datasets cannot read fails when the task is built.
    tasks = write_task(tmp_path / "tasks2", "broken_task", str(tmp_path / "broken.jsonl"))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(StageError, match="cannot build lm-eval task") as err:
        evaluate_adapter(EvalConfig(tasks=["broken_task"], include_path=str(tasks)), train_dir, tmp_path / "eval")
    assert err.value.field == "eval.tasks" and "\n" not in str(err.value)
    assert not (tmp_path / "eval").exists()
