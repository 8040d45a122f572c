"""Paths named by fetched data (save_to_disk metadata, a dataset card's data_files, object keys, archive
members) stay inside the data's directory: a property of the one helper that checks them, and the crafted
inputs that used to reach outside, end to end through the CLI (one line, exit 2, nothing created outside)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from helpers import use_offline_hub_cache
from lora_pipeline.cli import main
from lora_pipeline.errors import UnsafePathError
from lora_pipeline.files import confined

# Path-like text: separators, dots, drive letters and control characters far more often than chance would.
PIECES = st.sampled_from(["..", ".", "/", "\\", "a", "b.jsonl", "C:", "~", "\x00", "\n", " ", "link", "ok", "loop"])
PATHS = st.one_of(st.text(max_size=40), st.lists(PIECES, max_size=8).map("".join))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base/ with a file, a directory, a link inside and a link out; a sibling `outside/` beside it."""
    root = tmp_path_factory.mktemp("confine")
    base, outside = root / "base", root / "outside"
    (base / "ok").mkdir(parents=True)
    outside.mkdir()
    (base / "ok" / "b.jsonl").write_text("{}\n")
    (outside / "secret.jsonl").write_text("{}\n")
    (base / "link").symlink_to(outside)
    (base / "ok" / "inner").symlink_to(base / "ok" / "b.jsonl")
    (base / "loop").symlink_to(base / "loop")
    return base


@settings(max_examples=60, deadline=None)
@given(PATHS)
def test_confined_returns_a_path_inside_or_refuses(tree: Path, relative: str) -> None:
    try:
        path = confined(tree, relative, what="state.json _data_files filename", source="data.zip")
    except UnsafePathError as exc:
        message = str(exc)
        assert "\n" not in message and "\x00" not in message and "data.zip" in message
        assert str(tree) not in message  # names the archive, never the directory it was unpacked in
        return
    real = path.resolve()
    assert real.is_relative_to(tree.resolve()) and real != tree.resolve()


@settings(max_examples=60, deadline=None)
@given(PATHS)
def test_a_name_passing_the_text_checks_cannot_climb_out(relative: str) -> None:
    """What archives rely on before writing anything: no normalisation of an accepted name leaves the root."""
    import posixpath

    from lora_pipeline.files import unsafe_reason

    if unsafe_reason(relative) is None:
        normal = posixpath.normpath(relative.replace("\\", "/"))
        assert not normal.startswith(("/", "../")) and normal != ".." and ":" not in normal[1:2]


@pytest.mark.parametrize(
    "relative",
    ["/etc/passwd", "../outside/secret.jsonl", "ok/../../outside", "link/secret.jsonl", "C:/x", "C:\\x",
     "..\\outside", "a\x00b", "", ".", "ok/\n", "link", "loop/x", "./C:"],
)  # fmt: skip
def test_confined_refuses(tree: Path, relative: str) -> None:
    with pytest.raises(UnsafePathError, match="data.zip: the field .*; refused"):
        confined(tree, relative, what="the field", source="data.zip")


def test_confined_accepts_paths_inside(tree: Path) -> None:
    for relative in ("ok/b.jsonl", "ok/inner", "ok\\b.jsonl", "./ok/b.jsonl", "ok//b.jsonl"):
        assert confined(tree, relative, what="f", source="s").resolve() == (tree / "ok" / "b.jsonl").resolve()


def _dataset(uri: str, out: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    capsys.readouterr()  # what building the input printed (datasets' progress bars)
    code = main(["dataset", "--dataset.data_uri", uri, "--dataset.data_split", "1.0", "--out", str(out)])
    return code, capsys.readouterr().err.strip().splitlines()


def _saved_zip(tmp_path: Path, state: dict, name: str = "saved.zip") -> Path:
    """A zip of a save_to_disk directory whose state.json is `state` (its own .arrow file beside it)."""
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(4)]).save_to_disk(str(saved))
    (saved / "state.json").write_text(json.dumps(state))
    archive = tmp_path / name
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(saved.iterdir()):
            zf.write(f, f.name)
    return archive


@pytest.mark.parametrize(
    "filename",
    ["{secret}", "../../../../../../../../../../..{secret}", "../../..", "data-00000-of-00001.arrow\x00x",
     "..\\..\\x.arrow", {"no": "filename"}, 7],
)  # fmt: skip
def test_saved_dataset_state_naming_outside_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, filename: object
) -> None:
    import datasets

    secret = tmp_path / "private" / "secret.arrow"
    datasets.Dataset.from_list([{"text": "private"}] * 4).save_to_disk(str(secret.parent))
    secret = next(secret.parent.glob("*.arrow"))
    name = filename.format(secret=secret) if isinstance(filename, str) else filename
    archive = _saved_zip(tmp_path, {"_data_files": [{"filename": name}], "_fingerprint": "x"})
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = _dataset(str(archive), tmp_path / "ds", capsys)
    assert code == 2 and len(err) == 1, err
    assert "state.json _data_files filename" in err[0] and "saved.zip" in err[0] and "lora-pipeline-fetch" not in err[0]
    assert not (tmp_path / "ds").exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def test_saved_dataset_dict_split_naming_outside_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    saved = tmp_path / "dict"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["../../elsewhere"]}))
    code, err = _dataset(str(saved), tmp_path / "ds", capsys)
    assert code == 2 and len(err) == 1 and "dataset_dict.json split '../../elsewhere'" in err[0], err


def test_saved_dataset_inside_is_still_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    archive = _saved_zip(tmp_path, {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    code, err = _dataset(str(archive), tmp_path / "ds", capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["rows_used"] == 4


SHA = "0123456789abcdef0123456789abcdef01234567"


def _hub_with_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> Path:
    """An offline HF cache holding owner/name whose card's train split is `path`."""
    hub = tmp_path / "hub"
    snapshot = hub / "datasets--owner--name" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    card = f'---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: "{path}"\n---\n'
    (snapshot / "README.md").write_text(card)
    write_jsonl(snapshot / "train.jsonl", [{"text": "public"}] * 3)
    use_offline_hub_cache(hub, SHA, monkeypatch, tmp_path)
    return snapshot


@pytest.mark.parametrize("depth", [4, 30])
def test_dataset_card_path_outside_the_repository_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, depth: int
) -> None:
    secret = tmp_path / "secret" / "private.jsonl"
    secret.parent.mkdir()
    write_jsonl(secret, [{"text": "private"}] * 3)
    # 4 levels up from the snapshot is tmp_path; deeper, the absolute path is spelled out below the root.
    relative = "../" * 4 + "secret/private.jsonl" if depth == 4 else "../" * depth + str(secret).lstrip("/")
    # Fetch directories three levels down, so the link the card used to make would land inside tmp_path.
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "t1" / "t2" / "t3"))
    (tmp_path / "t1" / "t2" / "t3").mkdir(parents=True)
    _hub_with_card(tmp_path, monkeypatch, relative)
    code, err = _dataset("hf://owner/name", tmp_path / "ds", capsys)
    assert code == 2 and len(err) == 1, err
    assert "dataset card data_files path" in err[0] and "hf://owner/name" in err[0]
    links = [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert links == [] and not (tmp_path / "ds").exists()


def test_dataset_card_path_inside_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _hub_with_card(tmp_path, monkeypatch, "train.jsonl")
    code, err = _dataset("hf://owner/name", tmp_path / "ds", capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["files"] == ["train.jsonl"]


def test_object_keys_climbing_out_are_refused() -> None:
    from lora_pipeline.sources.s3 import _relative

    for key in ("p/../../x", "p//etc/passwd", "p/a\x00b"):
        with pytest.raises(UnsafePathError):
            _relative(key, "p/")
    assert _relative("p/a/b.jsonl", "p/") == "a/b.jsonl"


@pytest.mark.integration
def test_url_file_name_climbing_out_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_deadlines import http_server

    with http_server(lambda conn: conn.sendall(b"{}\n" * 4), 12) as uri:
        code, err = _dataset(uri.replace("/data.jsonl", "/dir/.."), tmp_path / "ds", capsys)
    assert code == 2 and len(err) == 1 and "file name in the URL '..' climbs out" in err[0], err


@pytest.mark.integration
def test_downloaded_zip_naming_an_absolute_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from test_deadlines import http_server

    secret = tmp_path / "private.arrow"
    secret.write_bytes(b"not to be read")
    data = _saved_zip(tmp_path, {"_data_files": [{"filename": str(secret)}]}).read_bytes()
    with http_server(lambda conn: conn.sendall(data), len(data)) as uri:
        code, err = _dataset(uri.replace("/data.jsonl", "/saved.zip"), tmp_path / "ds", capsys)
    assert code == 2 and len(err) == 1, err
    assert "/saved.zip: state.json _data_files filename" in err[0] and "is an absolute path" in err[0]
    assert "lora-pipeline-fetch" not in err[0] and not (tmp_path / "ds").exists()
