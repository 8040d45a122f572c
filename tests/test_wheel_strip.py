"""The embedded wheel's modules lose their comments and docstrings, never a line: a pod's traceback names the
line the repository has."""

from __future__ import annotations

import ast
import base64
import hashlib
import io
import lzma
import zipfile
from pathlib import Path

import pytest

from lora_pipeline.kubeflow.wheel import pack_for_embedding, strip_source

SRC = Path(__file__).resolve().parents[1] / "src"

STRIPPED = [
    (  # a `#` in a string, an f-string or a triple-quoted string is no comment
        'x = "a # b"  # why\ny = f"{x!r} # {\'#\'}"  # why\nz = """\n# kept\n"""\n',
        'x = "a # b"\ny = f"{x!r} # {\'#\'}"\nz = """\n# kept\n"""\n',
    ),
    (  # a body of only a docstring keeps it; so does a module
        'def f():\n    """Only this."""\n\n\nclass C:\n    """Only this."""\n',
        'def f():\n    """Only this."""\n\n\nclass C:\n    """Only this."""\n',
    ),
    ('"""Only a docstring."""\n', '"""Only a docstring."""\n'),
    (  # nested functions, a docstring on two lines, an async method
        'def outer():\n    """Outer."""\n\n    def inner():\n        """Inner,\n        two lines."""\n'
        "        return 1  # one\n\n    return inner\n\n\nclass K:\n"
        '    """K."""\n\n    async def run(self):\n        """Run."""\n        return await self.go()\n',
        "def outer():\n\n\n    def inner():\n\n\n        return 1\n\n    return inner\n\n\nclass K:\n"
        "\n\n    async def run(self):\n\n        return await self.go()\n",
    ),
    (  # line continuations, and comments between brackets
        "total = 1 + \\\n    2  # sum\nif total and \\\n        True:  # why\n    pass\n"
        "values = [\n    1,  # first\n    # alone\n    2,\n]\n",
        "total = 1 + \\\n    2\nif total and \\\n        True:\n    pass\nvalues = [\n    1,\n\n    2,\n]\n",
    ),
    (  # the shebang and encoding lines stay; ast's columns count bytes, not characters
        '#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n"""Naïve — café."""  # ünï\nx = "é"  # é\n',
        '#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n\nx = "é"\n',
    ),
    (  # a docstring sharing its line with more code stays
        'def f(): "doc"; return 1\ndef g():\n    """doc"""; return 2\n',
        'def f(): "doc"; return 1\ndef g():\n    """doc"""; return 2\n',
    ),
    (  # a module that reads `__doc__` (an argparse description) keeps its docstrings
        'def f():\n    """Help."""\n    return f.__doc__  # why\n',
        'def f():\n    """Help."""\n    return f.__doc__\n',
    ),
    ("x = 1  \n# the end", "x = 1  \n"),
]


@pytest.mark.parametrize(("source", "expected"), STRIPPED)
def test_strip_source(source: str, expected: str) -> None:
    assert strip_source(source) == expected
    _assert_same_code_on_the_same_lines(source, expected)


@pytest.mark.parametrize("module", sorted(SRC.rglob("*.py")), ids=lambda p: p.relative_to(SRC).as_posix())
def test_every_module_strips_to_the_same_code_on_the_same_lines(module: Path) -> None:
    source = module.read_text()
    stripped = strip_source(source)
    _assert_same_code_on_the_same_lines(source, stripped)
    assert len(stripped) <= len(source)


def _assert_same_code_on_the_same_lines(source: str, stripped: str) -> None:
    """Same line count, and the same syntax tree with positions (each line and column) once docstrings go."""
    assert stripped.count("\n") == source.count("\n")
    compile(stripped, "<stripped>", "exec", dont_inherit=True)
    before, after = (_without_docstrings(ast.parse(text)) for text in (source, stripped))
    assert ast.dump(after, include_attributes=True) == ast.dump(before, include_attributes=True)


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                node.body = node.body[1:] if isinstance(first.value.value, str) else node.body
    return tree


def test_packed_wheel_has_stripped_modules_and_a_record_that_matches(tmp_path: Path) -> None:
    """A small wheel, no build: the package's modules are stripped and RECORD lists each file's new digest."""
    info = "lora_pipeline-0.0.0.dist-info"
    files = {
        "lora_pipeline/a.py": b'"""Doc."""\nx = 1  # why\n',
        "lora_pipeline/demo/data/d.jsonl": b"{}\n",
        f"{info}/METADATA": b"Name: lora-pipeline\n\nThe README.\n",
        f"{info}/top_level.txt": b"lora_pipeline\n",
    }
    wheel = tmp_path / "lora_pipeline-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{name},,\n" for name in files))
    (tmp_path / "out").mkdir()
    packed = pack_for_embedding(wheel, tmp_path / "out")
    with zipfile.ZipFile(io.BytesIO(lzma.decompress(packed.read_bytes()))) as whl:
        unpacked = {name: whl.read(name) for name in whl.namelist()}
    assert unpacked["lora_pipeline/a.py"] == b"\nx = 1\n"
    assert unpacked[f"{info}/METADATA"] == b"Name: lora-pipeline\n"
    assert "lora_pipeline/demo/data/d.jsonl" not in unpacked
    rows = dict(row.split(",", 1) for row in unpacked.pop(f"{info}/RECORD").decode().splitlines())
    assert rows.pop(f"{info}/RECORD") == ","
    digests = {
        name: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        for name, data in unpacked.items()
    }
    assert rows == {name: f"sha256={digests[name]},{len(data)}" for name, data in unpacked.items()}
