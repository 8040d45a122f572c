"""files.sha256_file: the streamed digest equals the whole-file one, so cache keys and manifests keep their values;
files.tree_sha256: a directory by its content."""

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_pipeline.files import sha256_file, tree_sha256


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17])
def test_sha256_file_equals_whole_file_digest(tmp_path, size):
    path = tmp_path / "blob"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


names = st.text(alphabet="abcXYZ-_.é", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
trees = st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=64), min_size=1,
                        max_size=6)  # fmt: skip


def write_tree(root, files: dict[str, bytes], order: list[str]):  # noqa: ANN201 - a Path
    for rel in order:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(files[rel])
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=trees, data=st.data())
def test_tree_sha256_is_the_content_not_the_place(tmp_path_factory, files, data):
    """One digest for the registry, the local sources and eval's task files: the same names and bytes give the
    same digest wherever and in whatever order they were written; a changed byte or name changes it."""
    if any(a != b and b.startswith(a + "/") for a in files for b in files):
        return  # a file cannot also be a directory
    base = tmp_path_factory.mktemp("tree")
    first = tree_sha256(write_tree(base / "a", files, sorted(files)))
    shuffled = data.draw(st.permutations(sorted(files)))
    assert tree_sha256(write_tree(base / "x" / "b", files, shuffled)) == first
    rel = data.draw(st.sampled_from(sorted(files)))
    changed = {**files, rel: files[rel] + b"!"}
    assert tree_sha256(write_tree(base / "c", changed, sorted(changed))) != first
    renamed = {(k + "2" if k == rel else k): v for k, v in files.items()}
    if not any(k.startswith(rel + "2/") for k in renamed):
        assert tree_sha256(write_tree(base / "d", renamed, sorted(renamed))) != first
    alone = tree_sha256(write_tree(base / "e", {rel: files[rel]}, [rel]))
    assert tree_sha256(base / "a", [base / "a" / rel]) == alone  # `files` picks the files that count
