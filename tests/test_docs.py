"""The documentation: docs/options.md is the schema's own reference, and every relative link in README.md,
CONTRIBUTING.md and docs/*.md reaches a file (and a heading, when it names one)."""

from __future__ import annotations

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
