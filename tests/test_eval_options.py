"""Eval options without a model: typed k=v values, backends and the keys each takes (checked before any model
loads), the vLLM model's arguments and scoring flow (built and run against a stand-in on CPU), and
eval.verbosity as the run's log level."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import run_cli
from lora_pipeline.config import EvalConfig, from_dict
from lora_pipeline.config.loading import arg_value
from lora_pipeline.errors import ConfigError, StageError
from lora_pipeline.evaluation import backends, checks
from lora_pipeline.evaluation.backends import hf_gen_kwargs, resolve_backend, vllm_model_args
from lora_pipeline.evaluation.scoring import Scorer
from lora_pipeline.stages.evaluate import check_eval_options

# --- typed values ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["0", "-1", "+3", "0.7", "1e-3", "true", "False", "None", "'12'", '"x"', "abc", "inf", " 7 ", ""]
)
def test_values_are_typed_as_lm_eval_types_them(text: str) -> None:
    from lm_eval.utils import handle_arg_string

    assert repr(arg_value(text)) == repr(handle_arg_string(text))


def test_gen_kwargs_and_model_args_strings_are_typed_from_yaml_and_flags() -> None:
    cfg = from_dict({"eval": {"gen_kwargs": "temperature=0,do_sample=false,until=none,top_p=0.9"}})
    assert cfg.eval.gen_kwargs == {"temperature": 0, "do_sample": False, "until": None, "top_p": 0.9}
    assert cfg.eval.model_args == {}
    cfg = from_dict({"eval": {"model_args": "max_length=64,dtype=float32,revision='1'"}})
    assert cfg.eval.model_args == {"max_length": 64, "dtype": "float32", "revision": "1"}
    # A YAML mapping and JSON keep their own types; other k=v options (labels, env vars) stay strings.
    assert from_dict({"eval": {"gen_kwargs": {"temperature": "0"}}}).eval.gen_kwargs == {"temperature": "0"}
    assert from_dict({"eval": {"gen_kwargs": '{"temperature": 0.5}'}}).eval.gen_kwargs == {"temperature": 0.5}
    assert from_dict({"train": {"labels": "team=1"}}).train.labels == "team=1"


@pytest.mark.integration
def test_cli_flag_gives_the_number_zero(tmp_path: Path) -> None:
    out = run_cli("run", "--eval.gen_kwargs", "temperature=0,top_k=5", "--print_config", "-o", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "temperature: 0\n" in out.stdout and "top_k: 5\n" in out.stdout


# --- backends and their keys -----------------------------------------------------------------------------


def test_auto_backend_is_vllm_only_with_cuda_and_vllm(monkeypatch) -> None:
    for cuda, vllm, expected in [(False, False, "hf"), (True, False, "hf"), (False, True, "hf"), (True, True, "vllm")]:
        monkeypatch.setattr(backends, "cuda_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(backends, "vllm_importable", lambda vllm=vllm: vllm)
        assert resolve_backend("auto") == expected
    assert resolve_backend("hf") == "hf"


@pytest.mark.integration
def test_help_says_how_auto_picks(tmp_path: Path) -> None:
    out = run_cli("run", "--help")
    assert "--eval.backend" in out.stdout
    assert "auto (vllm when CUDA and the vllm package are importable, else hf)" in " ".join(out.stdout.split())


def test_explicit_vllm_without_cuda_is_one_line() -> None:
    if backends.vllm_missing() is None:
        pytest.skip("this machine has CUDA and vllm")
    with pytest.raises(ConfigError, match="vllm backend needs CUDA") as err:
        check_eval_options(EvalConfig(tasks=["split"], backend="vllm"))
    assert err.value.field == "eval.backend"


@pytest.fixture
def on_vllm(monkeypatch):
    """Pre-flight as on a machine with CUDA and vllm."""
    monkeypatch.setattr(checks, "vllm_missing", lambda: None)


@pytest.mark.parametrize(
    "backend, option, key, message",
    [
        ("hf", "model_args", "gpu_memory_utilization", "'gpu_memory_utilization' is an option of the vllm backend"),
        ("hf", "gen_kwargs", "presence_penalty", "'presence_penalty' is a generation option of the vllm backend"),
        ("hf", "gen_kwargs", "temprature", "did you mean 'temperature'"),
        ("vllm", "model_args", "attn_implementation", "'attn_implementation' is an option of the hf backend"),
        ("vllm", "model_args", "lora_local_path", "the adapter comes from the train stage"),
        ("vllm", "gen_kwargs", "num_beams", "'num_beams' is a generation option of the hf backend"),
    ],
)
def test_a_key_the_backend_cannot_take_fails_preflight(
    on_vllm, tmp_path: Path, backend: str, option: str, key: str, message: str
) -> None:
    cfg = EvalConfig(tasks=["split"], backend=backend, **{option: {key: 1}})
    with pytest.raises(ConfigError, match=message) as err:
        check_eval_options(cfg)
    assert err.value.field == f"eval.{option}" and "\n" not in str(err.value)


def test_the_specs_example_keys_work_on_the_backend_that_has_them(on_vllm) -> None:
    check_eval_options(EvalConfig(tasks=["split"], backend="hf", gen_kwargs={"max_tokens": 64, "temperature": 0}))
    check_eval_options(
        EvalConfig(
            tasks=["split"],
            backend="vllm",
            gen_kwargs={"max_tokens": 64, "temperature": 0, "top_p": 0.9},
            model_args={"gpu_memory_utilization": 0.8, "dtype": "bfloat16", "max_model_len": 2048},
        )
    )


def test_split_only_needs_no_lm_eval_task_index(monkeypatch) -> None:
    # With only the run's own split, nothing is looked up in lm-eval's task registry (seconds saved).
    monkeypatch.setattr(checks, "_task_manager", lambda *a: pytest.fail("task index built"))
    assert checks.checked_options(EvalConfig(tasks=["split"]), ConfigError) == ("hf", None)


@pytest.mark.parametrize("value", [0, -1, 2.5, "many", "<redacted>", True])
def test_max_tokens_must_be_a_positive_integer(value) -> None:
    with pytest.raises(ConfigError, match="max_tokens must be a positive integer") as err:
        check_eval_options(EvalConfig(tasks=["split"], backend="hf", gen_kwargs={"max_tokens": value}))
    assert err.value.field == "eval.gen_kwargs"


def test_max_tokens_is_hf_max_gen_toks() -> None:
    assert hf_gen_kwargs({"max_tokens": 5, "temperature": 0}) == {"max_gen_toks": 5, "temperature": 0}
    assert hf_gen_kwargs({"max_tokens": 5, "max_gen_toks": 7}) == {"max_gen_toks": 7}  # lm-eval's priority


# --- the vLLM model, on CPU --------------------------------------------------------------------------------


def _adapter(tmp_path: Path, **config) -> Path:
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 12, "base_model_name_or_path": "/m", **config}))
    return adapter


def test_vllm_model_args_base_plus_lora(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path, rank_pattern={"q_proj": 24})
    args = vllm_model_args("/m", adapter, None, {"gpu_memory_utilization": 0.8}, "auto", False)
    assert args == {
        "pretrained": "/m",
        "tokenizer": str(adapter),  # the chat template training used
        "lora_local_path": str(adapter),
        "max_lora_rank": 32,  # the smallest rank vLLM serves that holds the adapter's largest (24)
        "batch_size": "auto",
        "trust_remote_code": False,
        "gpu_memory_utilization": 0.8,
    }
    # Every argument is one lm-eval's vllm model or vLLM's engine takes (read without importing vllm).
    assert set(args) <= backends._vllm_model_keys()
    quantized = vllm_model_args("/m", adapter, {"bits": 4, "quant_type": "nf4"}, {}, 8, False)
    assert quantized["quantization"] == "bitsandbytes"
    with pytest.raises(StageError, match="8-bit base.*--eval.backend hf") as err:
        vllm_model_args("/m", adapter, {"bits": 8}, {}, 8, False)
    assert err.value.field == "eval.backend"
    with pytest.raises(StageError, match="DoRA"):
        vllm_model_args("/m", _adapter(tmp_path, use_dora=True), None, {}, 8, False)


def test_vllm_scores_base_and_tuned_on_one_engine(tmp_path: Path, monkeypatch) -> None:
    """The flow on a stand-in for lm-eval's vllm model: one engine, the base scored without the LoRA request."""
    import lm_eval

    from lora_pipeline.evaluation import scoring

    built: list[dict] = []

    class FakeVLLM:
        def __init__(self, **kwargs):
            built.append(kwargs)
            self.lora_request = ("finetuned", kwargs["lora_local_path"])

        def loglikelihood(self, requests, disable_tqdm=False):
            raise AssertionError("not called: simple_evaluate is a stand-in too")

        loglikelihood_rolling = generate_until = loglikelihood

    calls: list[dict] = []

    def fake_simple_evaluate(**kwargs):
        calls.append({"lora": kwargs["model"].lora_request, **kwargs})
        return {"results": {"t": {"acc,none": 0.5 if kwargs["model"].lora_request else 0.25}}}

    monkeypatch.setattr(scoring, "vllm_model_class", lambda: FakeVLLM)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    adapter = _adapter(tmp_path)
    cfg = EvalConfig(tasks=["t"], backend="vllm", gen_kwargs={"max_tokens": 8}, model_args={"enforce_eager": True})
    scorer = Scorer(cfg, None, ["t"], None, None, True, "auto", "cuda", "vllm")
    results = scorer.with_vllm("/m", adapter, None, False)
    assert len(built) == 1 and built[0]["enforce_eager"] is True
    assert [c["lora"] is None for c in calls] == [True, False]  # base first, then the adapter
    assert calls[1]["model_args"]["lora_local_path"] == str(adapter) and "lora_local_path" not in calls[0]["model_args"]
    assert all(c["gen_kwargs"] == {"max_tokens": 8} for c in calls)  # vLLM's own name, as given
    assert results["base"]["results"]["t"]["acc,none"] == 0.25 and results["tuned"]["results"]["t"]["acc,none"] == 0.5


# --- verbosity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "level, ours, libraries",
    [
        ("DEBUG", "DEBUG", "DEBUG"),
        ("INFO", "INFO", "WARNING"),  # third-party INFO lines (lm-eval's seeds, ...) only at DEBUG
        ("WARNING", "WARNING", "WARNING"),
        ("ERROR", "ERROR", "ERROR"),
    ],
)
def test_verbosity_sets_the_runs_log_levels(level: str, ours: str, libraries: str, monkeypatch) -> None:
    from lora_pipeline.logs import apply_verbosity

    for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)  # DEBUG sets them: undone after the test
    names = ["", "lm_eval", "transformers", "datasets"]
    loggers = [logging.getLogger(name) for name in names] + [logging.getLogger("lora_pipeline")]
    before = [lg.level for lg in loggers]
    try:
        apply_verbosity(level)
        assert [logging.getLevelName(lg.level) for lg in loggers] == [libraries] * len(names) + [ours]
    finally:
        for lg, value in zip(loggers, before, strict=True):
            lg.setLevel(value)
