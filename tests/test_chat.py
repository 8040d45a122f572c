"""`lora-pipeline chat`: base + adapter of a run directory, the run's template, streamed answers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from lora_pipeline.cli import main

QUESTION = "Which category does this sentence mention? Sentence: The wolf was in the kitchen."


@pytest.fixture(scope="module")
def run_dir(demo_assets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory laid out as the train stage writes it, with a random (non-zero) LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("chat-run")
    adapter = run / "train" / "adapter"
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, lora).save_pretrained(adapter)
    AutoTokenizer.from_pretrained(demo_assets.model_dir).save_pretrained(adapter)
    (run / "train" / "metrics.json").write_text(json.dumps({"quantization": None, "trust_remote_code": False}))
    return run


def manual_answers(run: Path, turns: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers written out by hand with transformers + peft: each turn sees the earlier ones."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run / "train" / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    base_ref = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_ref), adapter).eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    messages, answers = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[0]
            )
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": answer})
        answers.append(answer)
    return answers


@pytest.mark.integration
def test_prompt_answers_as_base_plus_adapter_greedy(run_dir: Path, capsys) -> None:
    assert main(["chat", "-o", str(run_dir), "--prompt", QUESTION, "--max_new_tokens", "12"]) == 0
    out = capsys.readouterr().out
    (expected,) = manual_answers(run_dir, [QUESTION], 12)
    assert expected.strip()  # the comparison below means something
    assert out == expected + "\n"


@pytest.mark.integration
def test_interactive_keeps_history_until_eof(run_dir: Path, capsys, monkeypatch) -> None:
    turns = [QUESTION, "And the second sentence: a red apple fell."]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(t + "\n" for t in turns)))
    assert main(["chat", "-o", str(run_dir), "--max_new_tokens", "8"]) == 0
    first, second = manual_answers(run_dir, turns, 8)
    assert capsys.readouterr().out == f"{first}\n{second}\n"


@pytest.mark.integration
def test_interactive_exit_and_blank_lines(run_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"\n{QUESTION}\n/exit\nnever answered\n"))
    assert main(["chat", "-o", str(run_dir), "--max_new_tokens", "8"]) == 0
    (first,) = manual_answers(run_dir, [QUESTION], 8)
    assert capsys.readouterr().out == f"{first}\n"


@pytest.mark.integration
def test_sampling_answers(run_dir: Path, capsys) -> None:
    argv = ["chat", "-o", str(run_dir), "--prompt", QUESTION, "--max_new_tokens", "4", "--temperature", "0.8"]
    assert main(argv) == 0
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "-o"),
        (["-o", "{empty}"], "run the train stage first"),
        (["-o", "{run}", "--max_new_tokens", "0"], "--max_new_tokens"),
        (["-o", "{run}", "--temperature", "-1"], "--temperature"),
        (["-o", "{run}", "--temperature", "nan"], "--temperature"),
    ],
)
def test_bad_chat_arguments_are_one_line(args: list[str], needle: str, run_dir: Path, tmp_path: Path, capsys) -> None:
    argv = ["chat", "--prompt", "hi", *(a.format(empty=tmp_path, run=run_dir) for a in args)]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0], err
