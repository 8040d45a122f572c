"""The documentation: docs/options.md is the schema's own reference, and every relative link in README.md,
CONTRIBUTING.md and docs/*.md reaches a file (and a heading, when it names one)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lora_pipeline.config import SECTIONS, fields_of
from lora_pipeline.options_reference import REGENERATE, options_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def test_options_reference_is_up_to_date():
    current = (ROOT / "docs" / "options.md").read_text()
    assert current == options_markdown(), f"docs/options.md is out of date: run `{REGENERATE}`"


def test_options_reference_lists_every_option():
    text = options_markdown()
    for section in SECTIONS:
        for f in fields_of(section):
            assert f"| `{section}.{f.name}` |" in text


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lowercased, punctuation dropped, spaces as hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text()).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            if count:
                seen[f"{slug}-{count}"] = 1
    return set(seen)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    assert doc.exists()
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.is_relative_to(ROOT):
            broken.append(f"{target} (outside the repository)")
        elif not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{doc.name}: broken links: {broken}"


def test_contributing_tree_names_every_module_and_only_those() -> None:
    """CONTRIBUTING.md's layout has one line per module of src/lora_pipeline, and no line for one that is gone."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    block = text.split("```\nsrc/lora_pipeline/\n", 1)[1].split("```", 1)[0]
    listed, folders = set(), []
    for line in block.splitlines():
        name = line.split()[0] if line.strip() else ""
        depth = (len(line) - len(line.lstrip())) // 2
        if depth == 0 or not name:  # tests/, bench/, ... beside the package
            continue
        folders = folders[: depth - 1]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
        elif name.endswith(".py"):
            listed.add("/".join([*folders, name]))
    package = ROOT / "src" / "lora_pipeline"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    # a package's __init__ that only re-exports or documents needs no line of its own
    modules -= {m for m in modules if m.endswith("__init__.py") and not _defines_code(package / m)}
    assert modules - listed == set(), "modules missing from CONTRIBUTING.md's layout"
    assert listed - modules - {m for m in listed if m.endswith("__init__.py")} == set(), "listed but gone"


def _defines_code(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in tree.body)
