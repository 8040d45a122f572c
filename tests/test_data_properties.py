"""Properties of the dataset stage on data nobody listed: rows of every format with random mutations (missing,
extra and mistyped fields, odd roles, multimodal content, hostile Unicode), written as JSONL, JSON, CSV or Parquet.

Whatever the rows, `cli.main(["dataset", ...])` either succeeds, with every row read accounted for (kept, or
dropped under a named reason) and every kept row one the train stage tokenizes, or exits 2 with one line naming
the file; never another exit code or a traceback. Table-driven cases below pin the defects these found.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CHAT_ROWS, cli_exit_code, write_jsonl
from helpers import FLOATS
from lora_pipeline.data.formats import ROLES, check_turns
from lora_pipeline.training.encoded_data import encode_rows

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets.model_dir)


# --- rows ----------------------------------------------------------------------------------------------------

# Any code point, lone surrogates included (JSON writes them as \ud800 escapes); NUL, RTL marks, emoji.
ANY_CHAR = st.characters(codec=None, blacklist_categories=())
TEXT = st.one_of(
    st.text(alphabet=ANY_CHAR, max_size=30),
    st.sampled_from(["", " ", "\n\t ", "\x00", "\u202eevil\u202c", "<|im_end|>"]),
    st.integers(1000, 5000).map(lambda n: "a" * n),
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), FLOATS, TEXT)
JUNK = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=6)  # fmt: skip
ROLE = st.one_of(
    st.sampled_from(["user", "assistant", "system", "User", "ASSISTANT", " system ", "tool", "function", "model"]), JUNK
)
CONTENT = st.one_of(
    TEXT,
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=3),
    st.lists(st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.just({"url": "x"})}), max_size=2),
    JUNK,
)


def good_text() -> st.SearchStrategy[str]:
    return st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=40).filter(str.strip)


@st.composite
def good_row(draw: st.DrawFn, fmt: str) -> dict:
    """A row of `fmt` that the stage must keep."""
    turns = draw(st.integers(1, 3))
    pairs = [(draw(good_text()), draw(good_text())) for _ in range(turns)]
    chat = [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    if fmt == "messages":
        return {"messages": chat}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]}
                                  for m in chat]}  # fmt: skip
    if fmt == "alpaca":
        return {"instruction": pairs[0][0], "input": draw(good_text()), "output": pairs[0][1]}
    if fmt == "prompt_completion":
        return {"prompt": pairs[0][0], "completion": pairs[0][1]}
    return {"text": pairs[0][0]}


@st.composite
def message(draw: st.DrawFn) -> object:
    kind = draw(st.sampled_from(["openai", "sharegpt", "missing", "junk"]))
    if kind == "openai":
        m = {"role": draw(ROLE), "content": draw(CONTENT)}
    elif kind == "sharegpt":
        m = {
            "from": draw(st.sampled_from(["human", "gpt", "GPT", "system", "observation"]) | JUNK),
            "value": draw(CONTENT),
        }
    elif kind == "missing":
        m = draw(st.sampled_from([{"role": "user"}, {"content": "x"}, {}, {"role": None, "content": "x"}]))
    else:
        return draw(JUNK)
    if draw(st.booleans()):
        m[draw(st.sampled_from(["name", "tool_calls", "weight"]))] = draw(JUNK)
    return m


@st.composite
def mutated_row(draw: st.DrawFn, fmt: str) -> object:
    """A row of `fmt` with one or more things wrong (or right by chance): the stage keeps it or names why not."""
    row = dict(draw(good_row(fmt)))
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["drop", "extra", "junk", "messages", "not-object"]))
        if how == "drop" and row:
            del row[draw(st.sampled_from(sorted(row)))]
        elif how == "extra":
            row[draw(st.sampled_from(["id", "meta", "score", "messages", "text", "instruction"]))] = draw(JUNK)
        elif how == "junk" and row:
            row[draw(st.sampled_from(sorted(row)))] = draw(JUNK)
        elif how == "messages":
            key = draw(st.sampled_from(["messages", "conversations", "prompt", "completion"]))
            row[key] = draw(st.lists(message(), max_size=5) | JUNK)
        elif how == "not-object":
            return draw(st.one_of(st.lists(JUNK, max_size=3), SCALAR))
    return row


# --- files ---------------------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _encodable(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def write_rows(path: Path, rows: list) -> None:
    """`rows` as the file type of `path`; tabular types hold objects only, non-strings as JSON text (as CSV
    exports carry lists), and no lone surrogate (no UTF-8 file can hold one)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # a string row too, as a JSON string
        return
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
        return
    rows = [r for r in rows if isinstance(r, dict) and _encodable(r)]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = [{k: _cell(r[k]) if k in r else None for k in columns} for r in rows]
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, columns)
            writer.writeheader()
            writer.writerows(table)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = [pa.array([r[k] for r in table], type=pa.string()) for k in columns]
        pq.write_table(pa.Table.from_arrays(arrays, names=columns), path)


def run_stage(path: Path, out: Path, *flags: str) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_exit_code(["dataset", "-o", str(out), "--dataset.data_uri", str(path), *flags])
    return code, err.getvalue().splitlines()


def check_outcome(code: int, err: list[str], out: Path, name: str, tokenizer) -> dict | None:
    """The stage's promise, whatever the rows: success with every row accounted for and every kept row tokenizable,
    or exit 2 and one line naming the file. Returns dataset.json on success."""
    text = "\n".join(err)
    assert "Traceback" not in text and "internal error" not in text, text
    if code != 0:
        errors = [line for line in err if line.startswith("lora-pipeline: ")]
        assert code == 2 and len(errors) == 1, text
        assert name in errors[0] or "rows are bad" in errors[0], errors[0]
        assert not list(out.rglob("train.jsonl")), "nothing half-written"
        return None
    (record_path,) = out.rglob("dataset.json")
    record = json.loads(record_path.read_text())
    assert record["rows_read"] == record["rows_valid"] + sum(d["count"] for d in record["dropped"].values())
    assert record["train_rows"] + record["eval_rows"] == record["rows_used"] <= record["rows_valid"]
    kept = []
    for split in ("train", "eval"):
        kept += [json.loads(line) for line in (record_path.parent / f"{split}.jsonl").read_text().splitlines()]
    assert len(kept) == record["rows_used"]
    for row in kept:
        if "text" in row:
            assert set(row) == {"text"} and isinstance(row["text"], str) and row["text"].strip()
        else:
            assert set(row) == {"messages"}
            assert all(set(m) == {"role", "content"} and m["role"] in ROLES for m in row["messages"])
            assert all(isinstance(m["content"], str) for m in row["messages"])
            check_turns(row["messages"])
    encode_rows(kept, tokenizer, SimpleNamespace(max_seq_len=256))  # the train stage's tokenization: no error
    return record


# --- properties ----------------------------------------------------------------------------------------------

SUFFIXES = st.sampled_from([".jsonl", ".json", ".csv", ".parquet"])


@SETTINGS
@given(
    fmt=st.sampled_from(FORMATS),
    suffix=SUFFIXES,
    good=st.integers(1, 6),
    data=st.data(),
)
def test_forced_format_keeps_good_rows_and_names_every_drop(fmt, suffix, good, data, tokenizer) -> None:
    """dataset.format forced: every well-formed row is kept, every other row is kept or dropped with a reason."""
    rows = data.draw(st.lists(good_row(fmt), min_size=good, max_size=good))
    bad = data.draw(st.lists(mutated_row(fmt), max_size=6))
    rows = data.draw(st.permutations(rows + bad))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{suffix}"
        write_rows(path, rows)
        out = Path(tmp) / "out"
        code, err = run_stage(path, out, "--dataset.format", fmt, "--dataset.max_bad_rows", "1")
        record = check_outcome(code, err, out, "rows", tokenizer)
        assert record is not None, err  # at least `good` rows are usable
        assert record["rows_valid"] >= good
        if suffix in (".jsonl", ".json"):
            assert record["rows_read"] == len(rows)


@SETTINGS
@given(
    formats=st.lists(st.sampled_from(FORMATS), min_size=1, max_size=3),
    suffix=SUFFIXES,
    forced=st.sampled_from(["auto", *FORMATS]),
    split=st.sampled_from(["0.5", "0.999", "1", "0.0001"]),
    subset=st.sampled_from(["0", "1", "1000"]),
    data=st.data(),
)
def test_any_rows_any_options_succeed_accounted_or_fail_in_one_line(
    formats, suffix, forced, split, subset, data, tokenizer
) -> None:
    """Mixed formats in one file, a format forced wrong, odd split/subset: success (rows accounted for) or one line."""
    rows = []
    for fmt in formats:
        rows += data.draw(st.lists(good_row(fmt) | mutated_row(fmt), max_size=5))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"rows{suffix}"
        write_rows(path, rows)
        out = Path(tmp) / "out"
        flags = ["--dataset.format", forced, "--dataset.data_split", split, "--dataset.subset", subset]
        code, err = run_stage(path, out, *flags)
        record = check_outcome(code, err, out, "rows", tokenizer)
        if record is not None:
            assert record["rows_used"] == min(record["rows_valid"], int(subset) or record["rows_valid"])


# --- the defects these found, pinned -------------------------------------------------------------------------

OK = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def _parquet(path: Path, columns: dict, names: list[str] | None = None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = list(columns.values())
    pq.write_table(pa.Table.from_arrays(arrays, names=names or list(columns)), path)


def _map_messages(path: Path) -> None:
    import pyarrow as pa

    chat = [[("role", "user"), ("content", "q")], [("role", "assistant"), ("content", "a")]]
    _parquet(path, {"messages": pa.array([chat] * 4, type=pa.list_(pa.map_(pa.string(), pa.string())))})


def _duplicate_columns(path: Path) -> None:
    import pyarrow as pa

    _parquet(path, {"a": pa.array(["x"] * 3), "b": pa.array(["y"] * 3)}, names=["text", "text"])


def _null_messages(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"messages": None, "text": f"row {i}"} for i in range(5)]), path)


FAILS = [  # name, file, writer (text or a function of the path), what the one line says
    ("csv-quote-never-closed", "d.csv", 'text\nfine\n"opened\nand every line after\n', "opened at line 3 is never"),
    ("parquet-duplicate-column", "d.parquet", _duplicate_columns, "names column 'text' twice"),
    ("csv-header-not-utf8", "d.csv", lambda p: p.write_bytes(b"text,o\xffther\na,b\n"), "header is not readable"),
    ("csv-header-bad-quote", "d.csv", 'text,"a"b\nx,y\n', "header is not readable (bad CSV quoting"),
]


@pytest.mark.parametrize("case,file,content,needle", FAILS, ids=[c[0] for c in FAILS])
def test_malformed_files_fail_in_one_line(case, file, content, needle, tmp_path: Path, tokenizer) -> None:
    path = tmp_path / file
    content(path) if callable(content) else path.write_text(content)
    code, err = run_stage(path, tmp_path / "out")
    check_outcome(code, err, tmp_path / "out", file, tokenizer)
    assert code == 2 and needle in err[-1], err


KEPT = [  # name, file, writer, rows read, rows kept, a reason expected among the dropped
    ("role-in-odd-case", "d.jsonl",
     [OK] * 3 + [{"messages": [{"role": "User", "content": "q"}, {"role": " ASSISTANT", "content": "a"}]}], 4, 4, None),
    ("image-part-named", "d.jsonl", [OK] * 9 + [{"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "a"}]}], 10, 9, "content has a part that is not text"),
    ("json-lines-named-json", "d.json", "".join(json.dumps(r) + "\n" for r in [OK] * 5), 5, 5, None),
    ("parquet-map-messages", "d.parquet", _map_messages, 4, 4, None),
    ("csv-stray-quote-row", "d.csv", 'text\n' + "fine\n" * 10 + '"a"b\n', 11, 10, "bad CSV quoting"),
    ("csv-nul-and-newline", "d.csv", 'text\n"a\x00b"\n"two\nlines"\n' + "x\n" * 8, 10, 10, None),
    # a null or empty column tells no format: these were read as messages (Parquet) or Alpaca (CSV), every row dropped
    ("parquet-null-column-of-another-format", "d.parquet", _null_messages, 5, 5, None),
    ("csv-empty-columns-of-another-format", "d.csv", "instruction,output,prompt,completion\n" + ",,p,c\n" * 5, 5, 5,
     None),
    ("jsonl-all-empty-still-named", "d.jsonl", [{"text": ""}] * 3 + [{"text": "t"}] * 30, 33, 30, "empty text"),
]  # fmt: skip


@pytest.mark.parametrize("case,file,content,read,kept,reason", KEPT, ids=[c[0] for c in KEPT])
def test_rows_read_as_meant(case, file, content, read, kept, reason, tmp_path: Path, tokenizer) -> None:
    path = tmp_path / file
    if callable(content):
        content(path)
    elif isinstance(content, list):
        write_jsonl(path, content)
    else:
        path.write_text(content)
    code, err = run_stage(path, tmp_path / "out")
    record = check_outcome(code, err, tmp_path / "out", file, tokenizer)
    assert record is not None, err
    assert (record["rows_read"], record["rows_valid"]) == (read, kept)
    if reason:
        assert any(r.startswith(reason) for r in record["dropped"]), record["dropped"]


def test_chat_rows_fixture_still_reads(chat_file: Path, tmp_path: Path, tokenizer) -> None:
    code, err = run_stage(chat_file, tmp_path / "out")
    record = check_outcome(code, err, tmp_path / "out", "chat", tokenizer)
    assert record is not None and record["rows_valid"] == len(CHAT_ROWS)


@pytest.mark.parametrize(
    "columns",
    ["{instruction: [q], output: a}", "{instruction: {x: 1}, output: a}", "{instruction: 1, output: a}",
     "{instruction: null, output: a}", "{instruction: '', output: a}"],
)  # fmt: skip
def test_column_mapping_to_no_column_name_is_one_line(columns: str, tmp_path: Path) -> None:
    """A YAML mapping value that is no column name: before, a list or dict was an internal TypeError."""
    config = tmp_path / "cfg.yaml"
    config.write_text(f"dataset:\n  columns: {columns}\n")
    data = write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}] * 3)
    code, err = run_stage(data, tmp_path / "out", "-c", str(config))
    errors = [line for line in err if line.startswith("lora-pipeline: ")]
    assert code == 2 and errors == [errors[0]] and "dataset.columns: instruction: expected a column name" in errors[0]


# --- .json files, streamed ----------------------------------------------------------------------------------


def _stream(path: Path) -> list:
    from lora_pipeline.data.readers import read_rows

    return [row for _, row in read_rows(path, path.name)]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(JUNK, max_size=8),
    wrap=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
    chunk=st.integers(1, 64),
)
def test_json_file_streamed_reads_what_json_loads_reads(rows: list, wrap: bool, indent, chunk: int) -> None:
    """Whatever the rows and wherever the reads cut them (a number, an escape, a multi-byte character), the
    streamed reader yields the rows json.loads would, and a file cut short is one error naming the file."""
    from unittest import mock

    from lora_pipeline.data import json_stream
    from lora_pipeline.data.readers import row_problem
    from lora_pipeline.errors import DataError

    text = json.dumps({"meta": {"n": [1, 2]}, "data": rows} if wrap else rows, indent=indent, ensure_ascii=False)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(json_stream, "CHUNK", chunk):
        path = Path(tmp) / "rows.json"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        if "\\ud8" in text or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            return  # a lone surrogate written raw is not UTF-8: covered by the UTF-8 cases
        got = _stream(path)
        want = [row_problem(r) or r for r in (json.loads(text)["data"] if wrap else json.loads(text))]
        assert len(got) == len(want)
        assert json.dumps(got, default=str) == json.dumps(want, default=str)
        path.write_bytes(text.encode("utf-8")[: max(1, len(text.encode("utf-8")) - 1)])
        with pytest.raises(DataError, match="rows.json"):
            _stream(path)


@pytest.mark.parametrize(
    "text,needle",
    [
        ('[{"text": "a"},\n{"text": "b"}\n{"text": "c"}]', "Expecting ',' delimiter (line 3)"),
        ('{"data": 5}', 'expected a list of rows or {"data": [...]}'),
        ('{"rows": []}', 'expected a list of rows or {"data": [...]}'),
        ("42", 'expected a list of rows or {"data": [...]}'),
        ('[{"text": "a"}] [1]', "Extra data (line 1)"),
        ("[" + "9" * 5000 + "]", "a number too long to read"),
        ("[" * 100_000 + "]" * 100_000, "nested too deep"),
        ("", "Expecting value (line 1)"),
    ],
)
def test_json_file_errors_are_one_line(text: str, needle: str, tmp_path: Path) -> None:
    from lora_pipeline.errors import DataError

    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        _stream(path)
    assert "rows.json" in str(err.value) and needle in str(err.value)


def test_json_file_not_utf8_names_the_line_across_reads(tmp_path: Path) -> None:
    from unittest import mock

    from lora_pipeline.data import json_stream
    from lora_pipeline.errors import DataError

    path = tmp_path / "rows.json"
    path.write_bytes(("[\n" + '{"text": "\u00e9\u00e9"},\n' * 50).encode() + b'{"text": "\xe9"}]')
    for chunk in (1, 7, 1 << 20):
        with mock.patch.object(json_stream, "CHUNK", chunk), pytest.raises(DataError) as err:
            _stream(path)
        assert str(err.value).endswith("rows.json is not valid UTF-8 (line 52)"), (chunk, err.value)


@settings(max_examples=30, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    train=st.lists(st.sampled_from(["good", "bad"]), min_size=1, max_size=6),
    held=st.lists(st.sampled_from(["good", "bad"]), min_size=1, max_size=6),
    mix=st.booleans(),
    data=st.data(),
)
def test_every_location_accounts_for_its_rows(fmt, train, held, mix, data) -> None:
    """data_uri, a weighted source and eval_uri each: rows_read = rows_valid + dropped, in dataset.json's top level
    (the training locations) and in each location's own entry. Before, eval_uri's drops were in the top level."""
    rows = {k: [data.draw(good_row(fmt) if g == "good" else mutated_row(fmt)) for g in kinds]
            for k, kinds in (("train", train), ("held", held))}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: Path(tmp) / f"{k}.jsonl" for k in rows}
        for k, path in paths.items():
            write_rows(path, rows[k])
        flags = ["--dataset.format", fmt, "--dataset.max_bad_rows", "1", "--dataset.eval_uri", str(paths["held"])]
        if mix:
            flags += ["--dataset.source", f"{paths['held']}@1.5"]
        code, err = run_stage(paths["train"], Path(tmp) / "out", *flags)
        if code != 0:
            assert code == 2 and "no usable row" in err[-1], err
            return
        (record_path,) = (Path(tmp) / "out").rglob("dataset.json")
        record = json.loads(record_path.read_text())
        for entry in [record, record["eval_source"], *record.get("sources", [])]:
            assert entry["rows_read"] == entry["rows_valid"] + sum(d["count"] for d in entry["dropped"].values())
        assert record["eval_source"]["rows_read"] == len(held)
