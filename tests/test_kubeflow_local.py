"""The compiled pipeline, run end to end under kfp.local on the demo model, scores as a plain `lora-pipeline run`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from helpers import run_compiled_pipeline_locally
from lora_pipeline.demo import DEMO_OVERRIDES

pytest.importorskip("kfp")


def _demo_yaml(demo_assets, path: Path) -> Path:
    """The demo config, made smaller (2 epochs, 40 eval rows) so both runs take seconds."""
    layer = json.loads(json.dumps(DEMO_OVERRIDES))
    layer["dataset"] = {"data_uri": str(demo_assets.data_file)}
    layer["train"].update(model=str(demo_assets.model_dir), epochs=2, lr_warmup=5)
    layer["eval"].update(tasks=[demo_assets.task_name], include_path=str(demo_assets.task_dir), limit=40)
    path.write_text(yaml.safe_dump(layer))
    return path


def _scores(eval_results: Path) -> dict[tuple[str, str, str], tuple[float, float]]:
    rows = json.loads(eval_results.read_text())["comparison"]
    return {(r["task"], r["metric"], r["filter"]): (r["base"], r["tuned"]) for r in rows}


@pytest.mark.integration
def test_kfp_local_run_scores_as_the_plain_run(
    demo_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:

    home = str(Path(demo_assets.model_dir).parents[1])
    env = {"LORA_PIPELINE_HOME": home, "HF_HUB_OFFLINE": "1"}
    config = _demo_yaml(demo_assets, tmp_path / "demo.yaml")

    started = time.perf_counter()
    plain = run_cli("run", "-c", str(config), "-o", str(tmp_path / "run"), env=env)
    plain_seconds = time.perf_counter() - started
    assert plain.returncode == 0, plain.stderr

    # The image already holds the package (here: this venv), so nothing is pip-installed.
    compiled = tmp_path / "pipeline.yaml"
    out = run_cli("compile", "-c", str(config), "-o", str(compiled), "--package-spec", "")
    assert out.returncode == 0, out.stderr
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    root, kfp_seconds = run_compiled_pipeline_locally(compiled, tmp_path, use_venv=False)
    with capsys.disabled():
        print(f"\nwall time: plain lora-pipeline run {plain_seconds:.1f}s, kfp.local run {kfp_seconds:.1f}s")

    (eval_results,) = root.rglob("eval_results.json")
    assert _scores(eval_results) == _scores(tmp_path / "run" / "eval" / "eval_results.json")

    # What KFP records: metrics logged on the Metrics artifacts, the chart as an HTML artifact.
    (run_root,) = root.iterdir()
    train = json.loads((run_root / "train-model" / "executor_output.json").read_text())
    logged = train["artifacts"]["output_metrics"]["artifacts"][0]["metadata"]
    recorded = json.loads((tmp_path / "run" / "train" / "metrics.json").read_text())
    assert logged["mean_loss"] == pytest.approx(recorded["mean_loss"], rel=1e-6)
    assert train["parameterValues"] == {"Output": "training completed"}
    assert (run_root / "train-model" / "output_loss_chart").read_text().lstrip().lower().startswith("<!doctype html")
    evaluated = json.loads((run_root / "evaluate-model" / "executor_output.json").read_text())
    scores = evaluated["artifacts"]["output_metrics"]["artifacts"][0]["metadata"]
    (base, tuned) = _scores(eval_results)[demo_assets.task_name, "acc", "none"]
    assert scores == pytest.approx(
        {
            f"{demo_assets.task_name}/acc/none": tuned,
            f"{demo_assets.task_name}/acc/none/base": base,
            f"{demo_assets.task_name}/acc/none/delta": tuned - base,
        }  # fmt: skip
    )
    assert not (run_root / "register-model").exists()  # no registry address: the register task did not run
