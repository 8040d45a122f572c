"""files.sha256_file: the streamed digest equals the whole-file one, so cache keys and manifests keep their values."""

import hashlib

import pytest

from lora_pipeline.files import sha256_file


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17])
def test_sha256_file_equals_whole_file_digest(tmp_path, size):
    path = tmp_path / "blob"
    path.write_bytes(bytes(i % 251 for i in range(size)))
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()
