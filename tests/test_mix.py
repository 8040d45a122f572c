"""Several data sources with weights (`--dataset.source URI[@WEIGHT]`, YAML `{uri, weight}`), a separate eval
set (`--dataset.eval_uri`), and the ready configs under examples/: in-process through cli.main."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from lora_pipeline.cli import main
from lora_pipeline.config import DatasetConfig, from_dict, validate
from lora_pipeline.config.mix import parse_sources, split_weight
from lora_pipeline.data import mixing
from lora_pipeline.errors import ConfigError
from lora_pipeline.files import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _rows(tag: str, n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"{tag} q{i}"}, {"role": "assistant", "content": f"{tag} a{i}"}]}
        for i in range(n)
    ]


def _tag(row: dict) -> str:
    return row["messages"][0]["content"].split()[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "a": write_jsonl(tmp_path / "a.jsonl", _rows("a", 10)),
        "b": write_jsonl(tmp_path / "b.jsonl", _rows("b", 20)),
        "e": write_jsonl(tmp_path / "e.jsonl", _rows("e", 4)),
    }


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_two_weighted_sources_counts_and_rows(capsys, files, tmp_path) -> None:
    out = tmp_path / "ds"
    code, err = _run(
        capsys, "dataset", "--dataset.source", f"{files['a']}@2.5", "--dataset.source", f"{files['b']}@0.5",
        "--dataset.data_split", "1.0", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    train = read_jsonl(out / "train.jsonl")
    by_source = Counter(_tag(r) for r in train)
    assert by_source == {"a": 25, "b": 10}  # round(2.5 * 10), round(0.5 * 20)
    a_copies = Counter(r["messages"][0]["content"] for r in train if _tag(r) == "a")
    assert set(a_copies) == {f"a q{i}" for i in range(10)} and set(a_copies.values()) <= {2, 3}  # every row kept
    b_rows = [r["messages"][0]["content"] for r in train if _tag(r) == "b"]
    assert len(set(b_rows)) == 10  # w < 1: a sample without repeats
    meta = read_json(out / "dataset.json")
    counts = [(s["option"], s["weight"], s["rows_valid"], s["rows_mixed"], s["train_rows"]) for s in meta["sources"]]
    assert counts == [("dataset.sources[1]", 2.5, 10, 25, 25), ("dataset.sources[2]", 0.5, 20, 10, 10)]
    assert meta["rows_used"] == meta["train_rows"] == 35
    again = tmp_path / "again"
    assert main(["dataset", "--dataset.source", f"{files['a']}@2.5", "--dataset.source", f"{files['b']}@0.5",
                 "--dataset.data_split", "1.0", "--out", str(again)]) == 0  # fmt: skip
    assert read_jsonl(again / "train.jsonl") == train  # seeded: the same mix


def test_yaml_sources_with_data_uri_and_eval_uri(capsys, files, tmp_path) -> None:
    """data_uri is one more source (weight 1, first); eval_uri is eval.jsonl and no split is cut."""
    config = tmp_path / "mix.yaml"
    layer = {"data_uri": str(files["a"]), "sources": [{"uri": str(files["b"]), "weight": 0.25}, str(files["a"])]}
    config.write_text(yaml.safe_dump({"dataset": {**layer, "eval_uri": str(files["e"]), "data_split": 0.5}}))
    out = tmp_path / "ds"
    code, err = _run(capsys, "dataset", "-c", str(config), "--out", str(out))
    assert code == 0, err
    assert read_jsonl(out / "eval.jsonl") == _rows("e", 4)
    assert Counter(_tag(r) for r in read_jsonl(out / "train.jsonl")) == {"a": 20, "b": 5}
    meta = read_json(out / "dataset.json")
    assert [s["option"] for s in meta["sources"]] == ["dataset.data_uri", "dataset.sources[1]", "dataset.sources[2]"]
    assert (meta["train_rows"], meta["eval_rows"], meta["eval_source"]["rows_valid"]) == (25, 4, 4)
    assert meta["config"]["data_split"] is None


def test_one_bad_source_is_one_line_naming_it(capsys, files, tmp_path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{not json", "[1, 2"])
    out = tmp_path / "ds"
    code, err = _run(capsys, "dataset", "--dataset.source", str(files["a"]), "--dataset.source", f"{bad}@2",
                     "--out", str(out))  # fmt: skip
    assert code == 2 and not out.exists()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"lora-pipeline: error: dataset.sources[2] ({bad})")


def test_bad_eval_uri_is_named(capsys, files, tmp_path) -> None:
    code, err = _run(capsys, "dataset", "--dataset.data_uri", str(files["a"]),
                     "--dataset.eval_uri", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "ds"))  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "dataset.eval_uri" in err


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "-0.5", "1e9", "0e0"])
def test_bad_flag_weights_are_one_line(capsys, files, tmp_path, weight) -> None:
    code, err = _run(capsys, "dataset", "--dataset.source", f"{files['a']}@{weight}", "--out", str(tmp_path / "d"))
    assert code == 2 and err.count("\n") == 1
    assert "dataset.sources[1]: weight of" in err and "Traceback" not in err


@pytest.mark.parametrize("weight", [0, -2, "nan", "heavy", True, [1], ".inf"])
def test_bad_yaml_weights_are_one_line(capsys, files, tmp_path, weight) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"sources": [{"uri": str(files["a"]), "weight": weight}]}}))
    code, err = _run(capsys, "run", "-c", str(config), "--print_config")
    assert code == 2 and err.count("\n") == 1 and "dataset.sources[1]: weight of" in err


def test_text_after_at_is_part_of_the_uri_with_a_hint(capsys, files) -> None:
    code, err = _run(capsys, "run", "--dataset.source", f"{files['a']}@heavy", "--print_config")
    assert code == 2 and "file not found" in err and "a weight after the last @ must be a number" in err


@settings(max_examples=50, deadline=None)
@given(
    user=st.text("abc:@/%", max_size=8),
    path=st.text("abcxyz/._-", min_size=1, max_size=12),
    weight=st.one_of(st.none(), st.floats(0.001, 1000).map(lambda w: f"{w:g}"), st.integers(1, 1000).map(str)),
)
def test_weight_is_the_number_after_the_last_at(user, path, weight) -> None:
    """Userinfo may hold `@`: only a number after the LAST `@` is a weight, and the URI comes back whole."""
    uri = f"s3://{user}@host/{path}" if user else f"s3://host/{path}"
    text = uri if weight is None else f"{uri}@{weight}"
    [entry] = parse_sources([text], "dataset.sources")
    assert entry == {"uri": uri, "weight": 1.0 if weight is None else float(weight)}
    assert split_weight(text) == (uri, weight)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=4),
    weights=st.lists(st.floats(0.01, 5.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_mixed_rows_take_round_w_n_of_each_source(sizes, weights, seed) -> None:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    ranges = [(s, s + n) for s, n in zip(starts, sizes, strict=True)]
    order, counts = mixing.mixed_rows(ranges, weights[: len(sizes)], seed)
    assert len(order) == sum(counts)
    seen = Counter(order)
    for (start, end), w, count in zip(ranges, weights, counts, strict=False):
        n = end - start
        assert count == round(w * n)
        times = [seen[i] for i in range(start, end)]
        assert sum(times) == count
        assert all(math.floor(w) <= t <= math.floor(w) + 1 for t in times) if n else count == 0
    assert mixing.mixed_rows(ranges, weights[: len(sizes)], seed)[0] == order


def test_each_source_content_is_in_the_fingerprint(files) -> None:
    cfg = validate(from_dict({"dataset": {"sources": [str(files["a"]), f"{files['b']}@0.5"]}})).dataset
    before = mixing.fingerprint(cfg)
    write_jsonl(files["b"], _rows("b", 21))
    assert mixing.fingerprint(cfg) != before
    cfg.sources[1]["weight"] = 0.75
    assert mixing.fingerprint(cfg) != mixing.fingerprint(DatasetConfig(sources=[dict(s) for s in cfg.sources[:1]]))


def test_source_credentials_are_never_printed(capsys, tmp_path) -> None:
    code = main(["run", "-o", str(tmp_path / "r"), "--print_config",
                 "--dataset.source", "https://alice:SeKrIt%40pw@example.invalid/x.jsonl@2"])  # fmt: skip
    printed = capsys.readouterr()
    assert code == 0 and "SeKrIt" not in printed.out + printed.err
    assert yaml.safe_load(printed.out)["dataset"]["sources"][0]["weight"] == 2.0


def test_sources_survive_compile_as_fixed_values(capsys, files, tmp_path) -> None:
    pytest.importorskip("kfp")
    from lora_pipeline.kubeflow.runtime import config_layer

    sources = [{"uri": str(files["a"]), "weight": 2.5}, {"uri": "hf://org/chat?split=train", "weight": 0.5}]
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"dataset": {"sources": sources, "eval_uri": str(files["e"])}}))
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "-c", str(config), "--package-spec", "", "-o", str(out)]) == 0, capsys.readouterr().err
    pipeline = next(yaml.safe_load_all(out.read_text()))
    source = pipeline["deploymentSpec"]["executors"]["exec-prepare-dataset"]["container"]["command"][-1]
    call = next(
        n
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run_component"
    )
    fixed = ast.literal_eval(call.args[2])
    layer = config_layer("dataset", {"data_uri": None}, fixed)
    restored = validate(from_dict(layer)).dataset
    assert restored.sources == sources and restored.eval_uri == str(files["e"])


def test_compile_refuses_a_source_with_credentials(capsys, files, tmp_path) -> None:
    pytest.importorskip("kfp")
    code, err = _run(capsys, "compile", "--dataset.source", "s3://KEY:SeKrIt@bucket/x.jsonl@2",
                     "-o", str(tmp_path / "p.yaml"))  # fmt: skip
    assert code == 2 and "dataset.sources" in err and "SeKrIt" not in err and not (tmp_path / "p.yaml").exists()


def test_unknown_key_in_a_source_is_named() -> None:
    with pytest.raises(ConfigError, match=r"dataset.sources\[1\]: unknown key 'wieght'"):
        from_dict({"dataset": {"sources": [{"uri": "x.jsonl", "wieght": 2}]}})


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load_and_validate(capsys, monkeypatch, example) -> None:
    monkeypatch.chdir(ROOT)  # the examples name the shipped demo data by its path in the repository
    code, err = _run(capsys, "run", "-c", str(example), "--print_config")
    assert code == 0, err


def test_examples_cover_the_common_jobs() -> None:
    names = {p.stem for p in (ROOT / "examples").glob("*.yaml")}
    assert {"qwen2.5-1.5b-qlora-hub", "cpu-smoke", "kubeflow-multinode", "mixed-sources"} <= names
    hub = yaml.safe_load((ROOT / "examples" / "qwen2.5-1.5b-qlora-hub.yaml").read_text())
    assert hub["dataset"]["data_uri"].startswith("hf://") and hub["train"]["lora_load_in_4bit"] is True
    assert yaml.safe_load((ROOT / "examples" / "kubeflow-multinode.yaml").read_text())["train"]["num_workers"] > 1
    assert json.dumps(yaml.safe_load((ROOT / "examples" / "mixed-sources.yaml").read_text())["dataset"]["sources"])


def test_run_dir_cache_follows_each_source(capsys, files, tmp_path) -> None:
    """A source's content and weight are in the dataset stage's key: an edit of the second source reruns it."""
    run = tmp_path / "run"
    argv = ["dataset", "-o", str(run), "--dataset.source", str(files["a"]), "--dataset.source", f"{files['b']}@0.5"]
    assert main(argv) == 0
    key = read_json(run / "dataset" / "stage.json")["key"]
    assert main(argv) == 0 and read_json(run / "run.json")["stages"]["dataset"]["status"] == "cached"
    write_jsonl(files["b"], _rows("b", 30))
    assert main(argv) == 0 and read_json(run / "dataset" / "stage.json")["key"] != key
    assert read_json(run / "dataset" / "dataset.json")["sources"][1]["rows_mixed"] == 15
    recorded = read_json(run / "run.json")["config"]["dataset"]["sources"]
    assert recorded == [{"uri": str(files["a"]), "weight": 1.0}, {"uri": str(files["b"]), "weight": 0.5}]
    capsys.readouterr()


def test_a_recorded_source_without_its_credentials_must_be_given_again(tmp_path) -> None:
    from lora_pipeline import pipeline

    config = from_dict({"dataset": {"sources": ["a.jsonl", "https://<redacted>@example.org/x.jsonl@2"]}})
    with pytest.raises(ConfigError, match=r"dataset.sources\[2\]: .*give --dataset.source again"):
        pipeline.check_recorded_source(config, tmp_path, ("dataset",))
    assert pipeline.source_is_recorded_only(config)
