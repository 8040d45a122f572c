"""Train stage on the tiny demo model: a standard PEFT adapter that changed, on a base that did not."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import train_config
from lora_pipeline.errors import StageError
from lora_pipeline.files import read_json
from lora_pipeline.progress import format_eta, progress_line
from lora_pipeline.stages.train import train_adapter
from lora_pipeline.training.cpu import cpu_threads


@pytest.fixture(scope="module")
def trained(demo_assets, demo_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "train"
    return train_adapter(train_config(demo_assets.model_dir, micro_batch_size=4, save_epoch=True), demo_dataset, out)


@pytest.mark.integration
def test_outputs(trained: Path) -> None:
    assert (trained / "adapter" / "adapter_model.safetensors").exists()
    assert (trained / "adapter" / "tokenizer_config.json").exists()
    assert (trained / "loss_chart.html").read_text().count("<svg") >= 1
    assert list((trained / "checkpoints").glob("checkpoint-*")), "save_epoch keeps a checkpoint per epoch"
    metrics = read_json(trained / "metrics.json")
    assert metrics["steps"] == 9  # 72 train rows / effective batch 8, one epoch
    assert metrics["effective_batch_size"] == 8 and metrics["world_size"] == 1
    assert "gradient_accumulation_steps" not in metrics  # passes per step vary: "batching" says how many
    assert metrics["eval_loss"] is not None
    losses = [h["loss"] for h in metrics["history"] if "loss" in h]
    assert len(losses) == 9 and all(loss > 0 for loss in losses)
    assert metrics["backend"] == "peft" and metrics["device"] == "cpu"
    batching = metrics["batching"]  # every row once: the real tokens are the dataset's
    assert batching["real_tokens"] == metrics["tokens"]["total"] <= batching["padded_tokens"]
    assert 0 <= batching["padding_share"] < 0.5 and batching["micro_batches_per_step"] >= 1
    assert metrics["tokens_per_second"] > 0 and metrics["sample_packing"] == {"requested": False, "applied": False}
    assert not [p for p in trained.parent.iterdir() if p.name.startswith(".")]  # work/temp dirs cleaned


@pytest.mark.integration
def test_adapter_config_names_base_and_targets_all_linear(trained: Path, demo_assets) -> None:
    cfg = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(Path(demo_assets.model_dir).resolve())
    names = {name.split(".")[-1] for name in cfg["target_modules"]}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no lm_head
    assert (cfg["r"], cfg["lora_alpha"]) == (16, 32)


@pytest.mark.integration
def test_adapter_loads_with_plain_peft_and_generates(trained: Path, demo_assets) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, trained / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(trained / "adapter")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which category: The cat slept."}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # LoRA B matrices start at zero: non-zero now means training moved them.
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    # The base weights on disk are untouched by training.
    fresh = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir).state_dict()
    assert all(torch.equal(fresh[k], reference[k]) for k in reference)


@pytest.mark.integration
def test_seed_makes_training_repeatable(demo_assets, demo_dataset, tmp_path: Path) -> None:
    cfg = train_config(demo_assets.model_dir, effective_batch_size=16, micro_batch_size=16)
    a = read_json(train_adapter(cfg, demo_dataset, tmp_path / "a") / "metrics.json")
    b = read_json(train_adapter(cfg, demo_dataset, tmp_path / "b") / "metrics.json")
    assert [h.get("loss") for h in a["history"]] == [h.get("loss") for h in b["history"]]


@pytest.mark.integration
def test_4bit_qlora_runs_on_cpu(demo_assets, demo_dataset, tmp_path: Path) -> None:
    cfg = train_config(
        demo_assets.model_dir, effective_batch_size=24, micro_batch_size=24, lora_load_in_4bit=True, lora_r=4
    )
    metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "q") / "metrics.json")
    assert metrics["quantization"]["bits"] == 4 and metrics["steps"] == 3


@pytest.mark.integration
def test_unknown_target_module_names_the_field(demo_assets, demo_dataset, tmp_path: Path) -> None:
    cfg = train_config(demo_assets.model_dir, lora_target_modules="no_such_proj")
    with pytest.raises(StageError) as err:
        train_adapter(cfg, demo_dataset, tmp_path / "t")
    assert err.value.field == "train.lora_target_modules"
    assert not (tmp_path / "t").exists()


def test_missing_model_names_the_field(demo_dataset, tmp_path: Path) -> None:
    with pytest.raises(StageError) as err:
        train_adapter(train_config(tmp_path / "nowhere"), demo_dataset, tmp_path / "t")
    assert err.value.field == "train.model"


@pytest.mark.integration
def test_threads_option_sets_torch_threads(demo_assets, demo_dataset, tmp_path) -> None:
    before = torch.get_num_threads()
    cfg = train_config(demo_assets.model_dir, threads=1, effective_batch_size=24)
    metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "t") / "metrics.json")
    assert metrics["threads"] == {"torch": 1, "from": "train.threads"}  # read back from torch while training
    assert torch.get_num_threads() == before  # restored for whatever runs next in this process


def test_threads_default_to_omp_num_threads_then_the_cores_this_process_may_use(monkeypatch) -> None:
    assert cpu_threads(3) == (3, "train.threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(0) == (2, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(0) == (len(os.sched_getaffinity(0)), "cpu affinity")


@pytest.mark.integration
def test_spec_defaults_4bit_two_epochs_with_eval_split_train_on_cpu(demo_assets, demo_dataset, tmp_path) -> None:
    # The spec's defaults: 4-bit QLoRA, 2 epochs, an eval split. bitsandbytes repacked the 4-bit weights for
    # CPU inference during the epoch-1 eval and the next training step failed; it must train through.
    cfg = train_config(
        demo_assets.model_dir, lora_load_in_4bit=True, epochs=2, effective_batch_size=24, micro_batch_size=24
    )
    metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "q") / "metrics.json")
    assert metrics["steps"] == 6 and metrics["eval_loss"] is not None
    assert len([h for h in metrics["history"] if "eval_loss" in h]) == 2


@pytest.mark.integration
def test_too_few_optimizer_steps_is_one_warning_recorded_in_metrics(demo_assets, demo_dataset, tmp_path, caplog):
    cfg = train_config(demo_assets.model_dir, effective_batch_size=128, micro_batch_size=0, epochs=2)
    with caplog.at_level("WARNING", logger="lora_pipeline"):
        metrics = read_json(train_adapter(cfg, demo_dataset, tmp_path / "few") / "metrics.json")
    assert metrics["steps"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "only 2 optimizer steps (72 rows, effective_batch_size 128, 2 epochs)" in warnings[0]
    assert metrics["warnings"] == [warnings[0].removeprefix("train: ")]
    assert not (tmp_path / "few" / "checkpoints").exists()  # no save_epoch: no empty folder either


@pytest.mark.integration
def test_plain_text_rows_train_on_every_token(demo_assets, tmp_path) -> None:
    from transformers import AutoTokenizer

    from lora_pipeline.tokenization import encode_text

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    encoded = encode_text(tokenizer, "The cat slept on the mat.", 128)
    assert encoded["labels"] == encoded["input_ids"] and encoded["input_ids"][-1] == tokenizer.eos_token_id
    data = tmp_path / "ds"
    data.mkdir()
    rows = [{"text": f"Note {i}: the cat slept on mat number {i}."} for i in range(24)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = read_json(train_adapter(train_config(demo_assets.model_dir), data, tmp_path / "t") / "metrics.json")
    assert metrics["train_rows"] == 24 and metrics["tokens"]["target"] > 24 * 8  # every token is a target


# The train stage in a fresh process, logging the way the CLI does (INFO for this package, WARNING for libraries,
# Python warnings printed), with stderr a pipe: no terminal.
TRAIN = """
import dataclasses, json, logging, sys
from pathlib import Path
from lora_pipeline.config import TrainConfig
from lora_pipeline.stages.train import train_adapter
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("lora_pipeline").setLevel(logging.INFO)
train_adapter(TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), Path(sys.argv[3]))
"""


@pytest.mark.integration
def test_without_a_terminal_progress_is_lines_and_there_is_no_warning(demo_assets, demo_dataset, tmp_path) -> None:
    # use_liger stays on (the spec default): on CPU that is an INFO line, not a warning. Checkpoints are saved.
    cfg = train_config(demo_assets.model_dir, epochs=2, use_liger=True, checkpoint_steps=4)
    config = json.dumps(dataclasses.asdict(cfg))
    out = subprocess.run(
        [sys.executable, "-c", TRAIN, config, str(demo_dataset), str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    assert not [line for line in lines if "WARNING" in line or "Warning" in line], out.stderr[-3000:]
    # Nothing else either, but this package's log lines and the model-loading bar.
    others = [line for line in lines if line.strip() and not line.startswith("INFO lora_pipeline.")]
    others = [line for line in others if "Loading weights" not in line]
    assert not others, out.stderr[-3000:]
    assert not [line for line in lines if "{'loss'" in line or "{'eval_loss'" in line]  # no raw logged dicts
    assert "/18 [" not in out.stderr  # no tqdm training bar (it reads `  0%|          | 0/18 [00:00<?, ?it/s]`)
    progress = [line for line in lines if "train: step " in line]
    assert 5 <= len(progress) <= 12, out.stderr[-3000:]
    assert "train: step 18/18 (100%) loss " in progress[-1] and " tok/s ETA 0:00" in progress[-1]
    steps = [int(line.split("train: step ")[1].split("/")[0]) for line in progress]
    assert steps == sorted(set(steps))  # one line per step at most, in order
    assert "train: eval loss " in out.stderr
    assert "INFO lora_pipeline.training.backends: train.use_liger: Liger kernels need CUDA" in out.stderr


@pytest.mark.integration
def test_on_a_terminal_progress_is_our_own_redrawn_line(demo_assets, demo_dataset, tmp_path) -> None:
    """The same training under a pseudo-terminal: no tqdm bar, no raw dicts, one line redrawn in place."""
    import pty
    import select
    import time

    cfg = train_config(demo_assets.model_dir, epochs=2)
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", TRAIN, json.dumps(dataclasses.asdict(cfg)), str(demo_dataset), str(tmp_path / "t")],
        stdin=subprocess.DEVNULL,
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    os.close(secondary)
    chunks, deadline = [], time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if select.select([primary], [], [], 1.0)[0]:
                try:
                    data = os.read(primary, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
                if not data:
                    break
                chunks.append(data)
    finally:
        os.close(primary)
        proc.wait(timeout=60)
    screen = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, screen[-3000:]
    assert "{'loss'" not in screen and "{'eval_loss'" not in screen  # no raw logged dicts
    assert "/18 [" not in screen  # no tqdm training bar
    clear = "\r\x1b[K"
    assert clear + "train: step 1/18 (5%) loss " in screen or clear + "train: step 2/18 (11%) loss " in screen
    visible = [line.rstrip("\r").rsplit(clear, 1)[-1] for line in screen.split("\n")]
    # the bar is cleared before every log line: no log line runs into it
    assert not [line for line in visible if "train: step" in line and not line.startswith("INFO lora_pipeline")]
    (last,) = [line for line in visible if "train: step" in line]
    assert "train: step 18/18 (100%) loss " in last and " tok/s ETA 0:00" in last
    assert "train: eval loss " in screen


def test_progress_line_format() -> None:
    line = progress_line(40, 900, 1.23456, 2e-4, steps_per_second=20.0, tokens_per_step=475.0)
    assert line == "step 40/900 (4%) loss 1.2346 lr 2.0e-04 9,500 tok/s ETA 0:43"  # 860 steps left at 20/s
    assert format_eta(3725) == "1:02:05"
    assert progress_line(0, 10, None, None, 0.0, 100.0) == "step 0/10 (0%)"  # nothing measured yet: no rate


@pytest.mark.integration
def test_tokenized_data_is_kept_by_content_and_reused(demo_assets, demo_dataset, tmp_path, caplog) -> None:
    enc = tmp_path / "encoded"
    cfg = train_config(demo_assets.model_dir, data_output_dir=str(enc), effective_batch_size=24)
    with caplog.at_level("INFO", logger="lora_pipeline"):
        first = read_json(train_adapter(cfg, demo_dataset, tmp_path / "a") / "metrics.json")
        assert not [r for r in caplog.records if "tokenized data reused" in r.getMessage()]
        second = read_json(train_adapter(cfg, demo_dataset, tmp_path / "b") / "metrics.json")
    assert [r for r in caplog.records if "tokenized data reused" in r.getMessage()]
    assert len(list(enc.iterdir())) == 1 and (next(enc.iterdir()) / "train.jsonl").exists()
    assert first["mean_loss"] == second["mean_loss"] and not (tmp_path / "b" / "data").exists()
    longer = train_config(demo_assets.model_dir, data_output_dir=str(enc), max_seq_len=96)
    train_adapter(longer, demo_dataset, tmp_path / "c")
    assert len(list(enc.iterdir())) == 2  # another sequence limit is other data


@pytest.mark.integration
def test_train_output_carries_the_eval_split_and_dataset_record(trained: Path, demo_dataset: Path) -> None:
    assert (trained / "eval.jsonl").read_bytes() == (demo_dataset / "eval.jsonl").read_bytes()
    assert read_json(trained / "dataset.json") == read_json(demo_dataset / "dataset.json")
    assert list((trained / "data").glob("*/train.jsonl"))  # default: tokenized data inside the stage output
