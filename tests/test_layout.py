"""The package's layering, read from the source with `ast`: who may import the CLI, the stages and the pipeline,
and how long a function may be."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lora_pipeline"

# The CLI's callers: `python -m lora_pipeline`, and the KFP component, which runs the stage's CLI command in its pod.
CLI_ENTRIES = {"__main__.py", "kubeflow/runtime.py"}
# The packages below the stages: the stages and the pipeline use them, never the reverse. They may read the
# stage table itself (`lora_pipeline.stages`: names, output files, hooks resolved lazily), as the run page does.
BELOW_STAGES = ("training", "data", "sources", "registry", "evaluation", "reports", "export")
STAGE_MODULES = tuple(
    f"lora_pipeline.stages.{p.stem}" for p in (PACKAGE / "stages").glob("*.py") if p.stem not in ("__init__", "outputs")
)
ABOVE = (*STAGE_MODULES, "lora_pipeline.pipeline")

MAX_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.relative_to(PACKAGE).as_posix(): ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module) -> set[str]:
    """Every module an import statement names, lazy imports inside functions included."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_or_under(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def test_only_the_entry_points_import_the_cli() -> None:
    importers = {
        path
        for path, tree in _modules().items()
        if path != "cli.py" and any(_is_or_under(name, "lora_pipeline.cli") for name in _imports(tree))
    }
    assert importers <= CLI_ENTRIES


def test_nothing_below_the_stages_imports_them_or_the_pipeline() -> None:
    upward = {
        (path, above)
        for path, tree in _modules().items()
        if path.split("/")[0] in BELOW_STAGES
        for name in _imports(tree)
        for above in ABOVE
        if _is_or_under(name, above)
    }
    assert upward == set()


def test_no_function_is_over_80_lines() -> None:
    long = {
        f"{path}::{node.name}"
        for path, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_LINES
    }
    assert long == set()


def test_every_hypothesis_float_strategy_leaves_out_subnormals() -> None:
    """A library loaded earlier in the session may set the CPU's flush-to-zero mode, and Hypothesis then refuses to
    draw subnormal floats (FloatingPointError): an unbounded `st.floats(...)` fails or not depending on which tests
    ran before it. So each one says allow_subnormal (helpers.FLOATS does) or gives both bounds."""
    bare = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "floats":
                keywords = {k.arg for k in node.keywords}
                bounded = len(node.args) >= 2 or {"min_value", "max_value"} <= keywords
                if "allow_subnormal" not in keywords and not bounded:
                    bare.append(f"{path.name}:{node.lineno}")
    assert not bare, f"st.floats without allow_subnormal=False or bounds (use helpers.FLOATS): {bare}"
