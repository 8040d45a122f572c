"""The `split` eval task: the run's own held-out rows, scored offline for base and tuned (loss, perplexity on
the assistant tokens, exact match of the generated answer), beside lm-eval's tasks in eval_results.json."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import run_cli
from helpers import train_config
from lora_pipeline.config import EvalConfig
from lora_pipeline.errors import StageError
from lora_pipeline.evaluation import backends, split_task
from lora_pipeline.evaluation.results import format_table
from lora_pipeline.files import read_json, read_jsonl
from lora_pipeline.stages.evaluate import evaluate_adapter, find_eval_split
from lora_pipeline.stages.train import train_adapter
from test_bad_inputs import LOG_LINE


@pytest.fixture(scope="module")
def run_dir(demo_assets, demo_dataset, tmp_path_factory) -> Path:
    """A run directory as `lora-pipeline run` lays it out: dataset/ beside train/."""
    root = tmp_path_factory.mktemp("splitrun")
    shutil.copytree(demo_dataset, root / "dataset")
    cfg = train_config(demo_assets.model_dir, effective_batch_size=16, micro_batch_size=16, epochs=2)
    train_adapter(cfg, root / "dataset", root / "train")
    return root


@pytest.mark.integration
def test_split_task_scores_base_and_tuned_on_the_runs_eval_split(demo_assets, run_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    cfg = EvalConfig(tasks=["split", demo_assets.task_name], include_path=str(demo_assets.task_dir), limit=12)
    out = evaluate_adapter(cfg, run_dir / "train", tmp_path / "eval")
    results = read_json(out / "eval_results.json")
    base, tuned = results["base"]["results"]["split"], results["tuned"]["results"]["split"]
    for metrics in (base, tuned):
        assert metrics["perplexity,none"] == pytest.approx(math.exp(metrics["loss,none"]))
        assert 0 <= metrics["exact_match,none"] <= 1
    # Training lowered the loss on rows it never saw, and the answers are at least as often right.
    assert tuned["loss,none"] < base["loss,none"] - 0.5, (base, tuned)
    assert tuned["exact_match,none"] >= base["exact_match,none"]
    assert results["tuned"]["n-samples"]["split"] == {"original": 12, "effective": 12}  # limit applies
    # lm-eval's task and the split sit side by side in the comparison and the table.
    rows = {(r["task"], r["metric"]) for r in results["comparison"]}
    expected = {("split", "loss"), ("split", "perplexity"), ("split", "exact_match"), (demo_assets.task_name, "acc")}
    assert expected <= rows
    assert "split" in format_table(results["comparison"])
    # Samples: one row per held-out row with the generated answer and its reference.
    sample = read_jsonl(out / "samples" / "tuned_split.jsonl")
    assert len(sample) == 12 and {"target", "response", "exact_match", "loss"} <= set(sample[0])
    assert time.monotonic() - started < 120


@pytest.mark.integration
def test_split_only_text_rows_give_loss_only(demo_assets, run_dir: Path, tmp_path: Path) -> None:
    # A train output whose eval split holds plain-text rows (loss on every token) and one chat row.
    train = tmp_path / "run" / "train"
    train.mkdir(parents=True)
    (train / "adapter").symlink_to(run_dir / "train" / "adapter")
    rows = [{"text": "The wrench was in the kitchen last week."}, {"text": "A violin on the table."}]
    (train / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(tasks=["split"], log_samples=False, compare_base=False)
    out = evaluate_adapter(cfg, train, tmp_path / "eval")
    results = read_json(out / "eval_results.json")
    metrics = results["tuned"]["results"]["split"]
    assert set(metrics) == {"alias", "loss,none", "perplexity,none"}  # no answers to match
    assert [r["metric"] for r in results["comparison"]] == ["loss", "perplexity"]
    assert not (out / "samples").exists()  # log_samples off: no samples file


@pytest.mark.integration
def test_max_tokens_reaches_generate(demo_assets, run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """gen_kwargs' max_tokens (the spec's, vLLM's name) bounds the split's generation on the hf backend, and
    reaches lm-eval's hf model as max_gen_toks."""
    from lm_eval.models.huggingface import HFLM
    from transformers import GenerationMixin

    seen: list[int] = []
    real_generate = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        # lm-eval's hf model asks for max_length = context + max_gen_toks; the split task for max_new_tokens.
        new = kwargs.get("max_new_tokens") or kwargs["max_length"] - kwargs["input_ids"].shape[1]
        seen.append(new)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    gen_requests: list[dict] = []
    real_until = HFLM.generate_until

    def until_spy(self, requests, *args, **kwargs):
        gen_requests.extend(req.args[1] for req in requests)
        return real_until(self, requests, *args, **kwargs)

    monkeypatch.setattr(HFLM, "generate_until", until_spy)
    task = _generation_task(tmp_path / "tasks", tmp_path / "gen.jsonl")
    cfg = EvalConfig(
        tasks=["split", "gen_task"], include_path=str(task), gen_kwargs={"max_tokens": 3}, limit=4, compare_base=False
    )
    out = evaluate_adapter(cfg, run_dir / "train", tmp_path / "eval")
    assert seen and set(seen) == {3}, seen
    assert gen_requests and all(r.get("max_gen_toks") == 3 and "max_tokens" not in r for r in gen_requests)
    results = read_json(out / "eval_results.json")
    assert results["tuned"]["config"]["gen_kwargs"]["max_gen_toks"] == 3


def _generation_task(directory: Path, data: Path) -> Path:
    directory.mkdir(parents=True)
    data.write_text("".join(json.dumps({"q": f"Name {i}", "a": "tool"}) + "\n" for i in range(4)))
    task = {
        "task": "gen_task",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{q}}",
        "doc_to_target": "{{a}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }
    (directory / "gen_task.yaml").write_text(json.dumps(task))
    return directory


def test_find_eval_split_order(tmp_path: Path) -> None:
    train = tmp_path / "run" / "train"
    train.mkdir(parents=True)
    with pytest.raises(StageError, match="eval.jsonl") as err:
        find_eval_split(train, {})
    assert err.value.field == "eval.tasks" and "\n" not in str(err.value)
    (tmp_path / "run" / "dataset").mkdir()
    (tmp_path / "run" / "dataset" / "eval.jsonl").write_text("{}\n")
    with pytest.raises(StageError, match="eval.jsonl"):  # a sibling stage's output is not an input of eval
        find_eval_split(train, {})
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "eval.jsonl").write_text("{}\n")
    recorded = {"dataset_dir": str(tmp_path / "elsewhere")}  # the dataset directory the train stage records
    assert find_eval_split(train, recorded) == tmp_path / "elsewhere" / "eval.jsonl"
    (train / "eval.jsonl").write_text("{}\n")  # a copy inside the train output wins
    assert find_eval_split(train, recorded) == train / "eval.jsonl"


def test_max_new_tokens_names_in_lm_eval_priority() -> None:
    assert split_task.max_new_tokens({}) is None
    assert split_task.max_new_tokens({"max_tokens": 5}) == 5
    assert split_task.max_new_tokens({"max_tokens": 5, "max_gen_toks": 7}) == 7


# --- the eval stage through the CLI: offline hub tasks, verbosity --------------------------------------------


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.integration
def test_hub_task_offline_is_one_line_naming_the_task(run_dir: Path, tmp_path: Path) -> None:
    before = _snapshot(run_dir / "train")
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    args = ["--input", f"train={run_dir / 'train'}", "--out", str(tmp_path / "eval"), "--eval.tasks", "arc_easy"]
    out = run_cli("eval", *args, env=offline)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(errors) == 1 and errors[0].startswith("lora-pipeline: error: eval.tasks: "), out.stderr[-2000:]
    assert "arc_easy" in errors[0] and "Traceback" not in out.stderr
    assert not (tmp_path / "eval").exists()
    assert _snapshot(run_dir / "train") == before  # the train stage's output is untouched


@pytest.mark.integration
@pytest.mark.parametrize("verbosity", ["WARNING", "DEBUG"])
def test_verbosity_applies_to_the_whole_run(run_dir: Path, tmp_path: Path, verbosity: str) -> None:
    args = ["--input", f"train={run_dir / 'train'}", "--out", str(tmp_path / "eval"), "--eval.tasks", "split"]
    out = run_cli("eval", *args, "--eval.limit", "4", "--eval.verbosity", verbosity)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = [line for line in out.stderr.splitlines() if " lora_pipeline" in line]
    if verbosity == "WARNING":  # our INFO lines (which backend, the table) are hidden
        assert not [line for line in ours if " INFO " in line], out.stderr
    else:  # ours at INFO and DEBUG, and libraries' debug lines too
        assert any(" INFO lora_pipeline" in line for line in ours), out.stderr
        assert [line for line in out.stderr.splitlines() if " DEBUG " in line and " lora_pipeline" not in line]
    assert (tmp_path / "eval" / "eval_results.json").exists()


@pytest.mark.integration
def test_at_info_third_party_info_lines_are_hidden_and_warnings_kept(
    run_dir: Path, tmp_path: Path, demo_assets
) -> None:
    args = ["--input", f"train={run_dir / 'train'}", "--out", str(tmp_path / "eval"), "--eval.limit", "8"]
    args += ["--eval.tasks", f"split,{demo_assets.task_name}", "--eval.include_path", str(demo_assets.task_dir)]
    out = run_cli("eval", *args)
    assert out.returncode == 0, out.stderr[-2000:]
    record = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")  # any logger's line
    log_lines = [line for line in out.stderr.splitlines() if record.match(line)]
    assert any(" INFO lora_pipeline" in line for line in log_lines), out.stderr
    assert not [line for line in log_lines if " INFO " in line and " lora_pipeline" not in line], out.stderr


@pytest.mark.integration
def test_a_narrower_re_eval_replaces_the_fuller_result_with_one_line(run_dir: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "eval"
    full = read_json(
        evaluate_adapter(EvalConfig(tasks=["split"], compare_base=False), run_dir / "train", out) / "eval_results.json"
    )
    assert full["scope"] == {"tasks": ["split"], "limit": -1} and "replaced" not in full
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        evaluate_adapter(EvalConfig(tasks=["split"], compare_base=False, limit=3), run_dir / "train", out)
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("eval: this narrower eval (limit 3 (was all documents)) replaces the earlier result (split ")
    quick = read_json(out / "eval_results.json")
    assert quick["replaced"]["comparison"] == full["comparison"] and quick["replaced"]["scope"] == full["scope"]


@pytest.mark.gpu
@pytest.mark.skipif(not backends.cuda_available() or not backends.vllm_importable(), reason="needs CUDA and vllm")
def test_vllm_backend_scores_base_and_adapter(demo_assets, run_dir: Path, tmp_path: Path) -> None:
    cfg = EvalConfig(
        tasks=["split", demo_assets.task_name],
        include_path=str(demo_assets.task_dir),
        backend="vllm",
        limit=20,
        model_args={"gpu_memory_utilization": 0.3, "enforce_eager": True},
    )
    results = read_json(evaluate_adapter(cfg, run_dir / "train", tmp_path / "eval") / "eval_results.json")
    assert results["backend"] == "vllm"
    task = demo_assets.task_name
    assert results["tuned"]["config"]["model_args"]["lora_local_path"].endswith("adapter")
    assert results["tuned"]["results"][task]["acc,none"] != results["base"]["results"][task]["acc,none"]
    assert "loss,none" in results["tuned"]["results"]["split"]
