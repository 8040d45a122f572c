"""`lora-pipeline export -o RUN`: merged model, GGUF (+ Ollama Modelfile) and Hub upload from a run's existing
adapter, without retraining and without touching the run's records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_pipeline.cli import main
from lora_pipeline.export.ollama import go_template, modelfile

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(5, 700, (2, 24), generator=torch.Generator().manual_seed(0))


def _adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero B matrices (so it changes the outputs), saved as the train stage saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    )
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.05
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run_dir(demo_assets, tmp_path_factory) -> Path:
    """A finished run's layout: run.json with the demo's config and train/adapter with its stage record."""
    from lora_pipeline.demo import demo_config

    run = tmp_path_factory.mktemp("exportrun") / "run"
    _adapter(demo_assets.model_dir, run / "train" / "adapter")
    (run / "train" / "metrics.json").write_text('{"merged": false}\n')
    record = {"config": demo_config(), "stages": {"train": {"key": "k", "status": "done"}}}
    (run / "run.json").write_text(json.dumps(record, indent=2))
    return run


def _digest(root: Path) -> dict[str, str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def adapter_logits(demo_assets, run_dir) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    expected = _logits(PeftModel.from_pretrained(base, run_dir / "train" / "adapter").eval())
    base = AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    assert not torch.allclose(_logits(base), expected, atol=1e-3)  # the adapter matters
    return expected


@pytest.mark.integration
def test_merged_export_reproduces_the_adapter_and_leaves_the_run_alone(run_dir, adapter_logits, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    before = _digest(run_dir)
    out = tmp_path / "exports"
    assert main(["export", "-o", str(run_dir), "--merged", "--out", str(out)]) == 0
    assert _digest(run_dir) == before  # run.json (config, stage keys) and train/ byte for byte
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert not (out / "merged" / "adapter_config.json").exists()
    got = _logits(merged)
    assert torch.allclose(got, adapter_logits, atol=1e-4), (got - adapter_logits).abs().max()
    assert not list(out.glob(".merged.tmp-*"))  # written atomically, nothing left beside it


# (type, max |logit diff| relative to the largest |logit|, top-1 agreement, weight error per block of 32 relative
# to the block's largest |weight|). The weight bounds are the formats' own rounding: f16 moves each value by at most
# 2**-11 of itself (the 2**-11 every case gets), bf16 by 2**-8, Q8_0 by half a step of
# max/127 and Q4_0 to a whole step of max/8 (its scale is max/-8, and +max clips to 7 steps); the 2**-11 also
# covers the Q types' f16-rounded scale. The logits bounds are what those weight errors do to this tiny random
# model, whose wide head amplifies them; Q4_0 on random weights keeps only a rough ranking, so it is checked by
# correlation rather than by the argmax.
GGUF_CASES = [
    ("f16", 2e-3, 1.0, 0.0),
    ("bf16", 2e-2, 0.95, 2**-8),
    ("q8_0", 5e-2, 0.9, 1 / 254),
    ("q4_0", None, None, 1 / 8),
]


@pytest.mark.integration
@pytest.mark.parametrize(("kind", "logit_tol", "top1", "weight_tol"), GGUF_CASES, ids=[c[0] for c in GGUF_CASES])
def test_gguf_loads_back_and_matches_the_merged_model(
    run_dir, adapter_logits, tmp_path, kind, logit_tol, top1, weight_tol
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exports"
    assert main(["export", "-o", str(run_dir), "--gguf", kind.upper(), "--merged", "--out", str(out)]) == 0
    folder = out / f"gguf-{kind}"
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    _check_weights(loaded.state_dict(), merged.state_dict(), weight_tol)
    got, want = _logits(loaded), adapter_logits
    if logit_tol is not None:
        assert (got - want).abs().max() <= logit_tol * want.abs().max()
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= top1
    else:
        assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.8
    assert (folder / "Modelfile").read_text().startswith("FROM ./model.gguf\n")


def _check_weights(loaded: dict, merged: dict, tol: float) -> None:
    assert set(loaded) == set(merged)
    for name, want in merged.items():
        got = loaded[name]
        if want.ndim < 2:  # norms and biases are stored as F32
            assert torch.equal(got, want), name
            continue
        blocks = want.reshape(-1, 32)
        bound = blocks.abs().amax(dim=1, keepdim=True) * (tol + 2**-11) + 1e-7
        assert ((got.reshape(-1, 32) - blocks).abs() <= bound).all(), name


@pytest.mark.integration
def test_gguf_tokenizer_and_modelfile(run_dir, tmp_path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "exports"
    assert main(["export", "-o", str(run_dir), "--gguf", "f16", "--out", str(out)]) == 0
    folder = out / "gguf-f16"
    original = AutoTokenizer.from_pretrained(run_dir / "train" / "adapter")
    loaded = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
    text = original.apply_chat_template([{"role": "user", "content": "What is 3 plus 4?"}], tokenize=False)
    assert loaded(text).input_ids == original(text).input_ids
    assert loaded.eos_token == original.eos_token
    reader = gguf.GGUFReader(folder / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    assert reader.fields["tokenizer.chat_template"].contents() == original.chat_template
    text = (folder / "Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_gguf_llama_and_mistral_layouts(demo_assets, tmp_path, arch) -> None:
    """Llama-family q/k weights are stored in llama.cpp's rotary layout; transformers undoes it on load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lora_pipeline.export.gguf import write_gguf

    tokenizer = AutoTokenizer.from_pretrained(demo_assets.model_dir)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    # name: transformers reads a llama-architecture file named exactly "mistral" as Mistral, which this gguf
    # version's name table lacks; llama.cpp's converter writes Mistral as llama, as the export does.
    write_gguf(model, tokenizer, tmp_path / "model.gguf", "f16", name=f"tiny-{arch}")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    want, got = _logits(model), _logits(loaded)
    assert (got - want).abs().max() <= 2e-3 * want.abs().max()


@pytest.mark.parametrize(
    ("marker", "stop"),
    [("<|im_start|>", "<|im_end|>"), ("<|start_header_id|>", "<|eot_id|>"), ("[INST]", "</s>"), ("plain", None)],
)
def test_chat_templates_map_to_ollama_templates(marker, stop) -> None:
    template, stops = go_template(f"{{% for m in messages %}}{marker}{{{{ m.content }}}}{{% endfor %}}")
    assert (template is None) == (stop is None)
    assert stops == ((stop,) if stop else ())


class _Tok:
    def __init__(self, chat_template: str | None, eos: str) -> None:
        self.chat_template, self.eos_token = chat_template, eos


@settings(max_examples=40, deadline=None)
@given(eos=st.text(min_size=1, max_size=20), template=st.none() | st.text(max_size=80))
def test_modelfile_is_well_formed_for_any_template_and_eos(eos, template) -> None:
    """Whatever the tokenizer holds, the Modelfile keeps FROM first, one quoted line per stop token (the eos
    among them, read back unchanged), and any unconverted template only as comments."""
    text = modelfile(_Tok(template, eos))
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    decoded = [json.loads(line[len("PARAMETER stop ") :]) for line in stops]
    assert eos in decoded and len(decoded) == len(set(decoded))
    if go_template(template)[0] is None:
        assert all(not line or line.startswith(("FROM", "#", "PARAMETER")) for line in lines)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    """The stand-in Hub, with huggingface_hub pointed at it: xet off (the stand-in speaks the plain commit API),
    online (the tests run with HF_HUB_OFFLINE=1), and a token in the environment only."""
    import huggingface_hub.constants as constants

    from hub_standin import HubStandIn

    with HubStandIn() as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield standin


TOKEN = "hf_standinSECRETtoken123"


def test_push_to_hub_uploads_the_adapter(run_dir, hub, tmp_path, capsys, caplog) -> None:
    before = _digest(run_dir)
    assert main(["export", "-o", str(run_dir), "--push-to-hub", "me/demo-adapter", "--private"]) == 0
    repo = hub.repos["me/demo-adapter"]
    adapter = run_dir / "train" / "adapter"
    assert repo["private"] is True
    assert repo["files"] == {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    assert {auth for method, _, auth in hub.requests if method == "POST"} == {f"Bearer {TOKEN}"}
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text
    assert _digest(run_dir) == before


@pytest.mark.integration
def test_push_to_hub_uploads_merged_and_gguf(run_dir, hub, tmp_path) -> None:
    out = tmp_path / "exports"
    args = ["export", "-o", str(run_dir), "--merged", "--gguf", "q8_0", "--out", str(out), "--push-to-hub", "me/m"]
    assert main(args) == 0
    files = hub.repos["me/m"]["files"]
    for folder in (out / "merged", out / "gguf-q8_0"):
        for path in folder.iterdir():
            assert files[path.name] == path.read_bytes()
    assert {"model.safetensors", "config.json", "model.gguf", "Modelfile"} <= set(files)


def test_hub_failure_is_one_line_without_the_token(run_dir, hub, capsys) -> None:
    hub.fail_next = [500] * 10  # past huggingface_hub's own retries
    assert main(["export", "-o", str(run_dir), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--push-to-hub" in err and "stand-in failure" in err
    assert TOKEN not in err  # the stand-in echoes the Authorization header; the CLI scrubs it


def _bad_cases(tmp: Path, run: Path) -> list[tuple[list[str], str]]:
    empty = tmp / "empty-run"
    empty.mkdir(exist_ok=True)
    blocker = tmp / "a-file"
    blocker.write_text("")
    return [
        (["-o", str(empty), "--merged"], "no trained adapter"),
        (["-o", str(tmp / "missing"), "--gguf", "f16"], "no trained adapter"),
        (["-o", str(run), "--gguf", "q4_k_m"], "--gguf"),
        (["-o", str(run), "--gguf", ""], "--gguf"),
        (["-o", str(run), "--merged", "--out", str(blocker / "sub")], "--out"),
        (["-o", str(run), "--merged", "--out", str(run / "train" / "x")], "inside the train stage's output"),
        (["-o", str(run)], "nothing to export"),
        (["-o", str(run), "--push-to-hub", "not a/valid/repo"], "--push-to-hub"),
    ]


def test_bad_export_input_is_one_line_exit_2(run_dir, tmp_path, capsys) -> None:
    """Each is refused before any model loads (the whole table takes well under a second of work)."""
    for args, expected in _bad_cases(tmp_path, run_dir):
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("lora-pipeline: error: ") and err.count("\n") == 1 and expected in err, (args, err)
    assert not (run_dir / "export").exists()


def test_read_only_export_folder_is_refused(run_dir, tmp_path, capsys, monkeypatch) -> None:
    import os

    locked = tmp_path / "ro"
    locked.mkdir()
    real_access = os.access
    # Tests run as root, whom a chmod does not stop: the folder reads as unwritable the way a user's would.
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    assert main(["export", "-o", str(run_dir), "--merged", "--out", str(locked / "x")]) == 2
    assert "cannot write" in capsys.readouterr().err
