"""The one config: every spec parameter present with the spec's default, and validation errors that name the field."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lora_pipeline.config import SECTIONS, Config, coerce, field_type, fields_of, from_dict, kfp_parameters, validate
from lora_pipeline.errors import ConfigError

SPEC_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "spec"


def _spec_rows(name: str) -> dict[str, tuple[str, str]]:
    """Parameter -> (type, default) parsed from a spec table."""
    rows = {}
    for line in (SPEC_DIR / name).read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2].strip("`"))
    return rows


def _spec_value(text: str, typ: str):
    if text in ("None", "Required"):
        return None
    if typ in ("int", "float"):
        return ast.literal_eval(text)
    if typ == "bool" or typ == "Optional[bool]":
        return {"True": True, "False": False}[text]
    if typ in ("list", "dict"):
        return ast.literal_eval(text)
    return text.strip('"')


def _field_default(section: str, name: str):
    for f in fields_of(section):
        if f.name == name:
            return getattr(getattr(Config(), section), name)
    raise KeyError(name)


@pytest.mark.skipif(not SPEC_DIR.exists(), reason="shared/spec is not beside this checkout")
def test_every_pipeline_parameter_exists_with_the_spec_default() -> None:
    spec = _spec_rows("lora_pipeline.md")
    mapping = kfp_parameters()
    assert len(spec) == 46
    assert set(spec) == set(mapping), set(spec) ^ set(mapping)
    for name, (typ, default) in spec.items():
        section, field_name = mapping[name]
        assert _field_default(section, field_name) == _spec_value(default, typ), name


@pytest.mark.skipif(not SPEC_DIR.exists(), reason="shared/spec is not beside this checkout")
def test_every_training_component_parameter_exists() -> None:
    spec = _spec_rows("lora_training_component.md")
    components = {
        f.metadata["component"]: (s, f.name) for s in SECTIONS for f in fields_of(s) if "component" in f.metadata
    }
    # pvc_path, the KFP artifacts and kubernetes_config are component plumbing, not training options.
    plumbing = {"pvc_path", "output_model", "output_metrics", "output_loss_chart", "dataset", "kubernetes_config"}
    assert set(spec) - plumbing == set(components), (set(spec) - plumbing) ^ set(components)
    for extra in (
        "bnb_4bit_quant_type",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_use_double_quant",
        "fsdp_sharding_strategy",
        "data_output_dir",
    ):
        assert components[f"training_lora_{extra}" if extra.startswith("bnb") else f"training_{extra}"] == (
            "train",
            extra,
        )


def test_defaults_validate() -> None:
    validate(Config())


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train": {"lora_rr": 8}}, "train.lora_rr"),
        ({"trian": {"lora_r": 8}}, "trian"),
        ({"train": {"lora_r": "eight"}}, "train.lora_r"),
        ({"train": {"lora_r": 1.5}}, "train.lora_r"),
        ({"train": {"epochs": True}}, "train.epochs"),
        ({"train": {"use_liger": "maybe"}}, "train.use_liger"),
        ({"eval": {"tasks": {"a": 1}}}, "eval.tasks"),
        ({"eval": {"gen_kwargs": "temperature"}}, "eval.gen_kwargs"),
        ({"dataset": "x"}, "dataset"),
    ],
)
def test_bad_types_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train": {"lora_r": 0}}, "train.lora_r"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate"),
        ({"train": {"lora_dropout": 1.0}}, "train.lora_dropout"),
        ({"train": {"lr_scheduler": "exponential"}}, "train.lr_scheduler"),
        ({"train": {"num_procs": "two"}}, "train.num_procs"),
        ({"train": {"memory": "lots"}}, "train.memory"),
        ({"train": {"labels": "team"}}, "train.labels"),
        ({"train": {"bnb_4bit_quant_type": "int4"}}, "train.bnb_4bit_quant_type"),
        ({"train": {"fsdp_sharding_strategy": "ALL"}}, "train.fsdp_sharding_strategy"),
        (
            {"train": {"lora_load_in_4bit": True, "lora_load_in_8bit": True}},
            "train.lora_load_in_4bit/train.lora_load_in_8bit",
        ),
        ({"dataset": {"data_split": 0}}, "dataset.data_split"),
        ({"dataset": {"data_split": 1.5}}, "dataset.data_split"),
        ({"dataset": {"subset": -1}}, "dataset.subset"),
        ({"dataset": {"data_uri": "/no/such/file.jsonl"}}, "dataset.data_uri"),
        ({"eval": {"limit": 0}}, "eval.limit"),
        ({"eval": {"batch_size": "big"}}, "eval.batch_size"),
        ({"eval": {"verbosity": "LOUD"}}, "eval.verbosity"),
        ({"eval": {"tasks": []}}, "eval.tasks"),
        ({"registry": {"version": "1.0"}}, "registry.version"),
        ({"registry": {"port": 70000}}, "registry.port"),
    ],
)
def test_bad_values_name_the_field(data: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(from_dict(data))
    assert err.value.field == field


def test_coerce_from_cli_strings() -> None:
    assert coerce("32", field_type("train", "lora_r"), "x") == 32
    assert coerce("false", field_type("train", "use_liger"), "x") is False
    assert coerce("none", field_type("train", "bnb_4bit_use_double_quant"), "x") is None
    assert coerce("arc_easy, hellaswag", field_type("eval", "tasks"), "x") == ["arc_easy", "hellaswag"]
    assert coerce('["mmlu"]', field_type("eval", "tasks"), "x") == ["mmlu"]
    assert coerce('{"temperature": 0}', field_type("eval", "gen_kwargs"), "x") == {"temperature": 0}
    assert coerce("dtype=float32,max_length=64", field_type("eval", "model_args"), "x") == {
        "dtype": "float32",
        "max_length": "64",
    }
    assert coerce(4, field_type("train", "cpu"), "x") == "4"  # YAML reads `cpu: 4` as an int


def test_overlay_keeps_other_values() -> None:
    config = from_dict({"train": {"lora_r": 8}})
    config = from_dict({"train": {"lora_alpha": 16}}, config)
    assert (config.train.lora_r, config.train.lora_alpha) == (8, 16)
    assert Config().train.lora_r == 16  # defaults are not shared between instances


def test_each_field_has_a_description_and_snake_case_name() -> None:
    for section in SECTIONS:
        for f in fields_of(section):
            assert f.metadata["help"], f.name
            assert re.fullmatch(r"[a-z][a-z0-9_]*", f.name)
