"""This project's own wheel, embedded in each compiled component so that every pod installs exactly this code.

`compile` builds the wheel from the checkout (or repacks the installed distribution), strips its modules'
comments and docstrings (keeping every line where it was), stores it uncompressed and xz-compresses it whole:
about 130 KiB, under half of the deflated wheel, so four embedded copies (one per component) make a pipeline
YAML of about 730 KiB, under 1 MiB. KFP embeds the `.whl.xz` with `embedded_artifact_path` and extracts it
when the executor starts, after its own `pip install`, so each component installs the wheel itself first:
`install_lora_pipeline` below is shipped as source (KFP's `additional_funcs`) and may use the standard
library only.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import importlib.metadata
import io
import lzma
import re
import shutil
import subprocess
import sys
import tempfile
import tokenize
import zipfile
from pathlib import Path

from lora_pipeline.errors import ConfigError

WHEEL_ENV = "LORA_PIPELINE_WHEEL"  # where install_lora_pipeline left the wheel in a pod


def install_lora_pipeline(pip_options: list) -> None:
    """Install the wheel KFP extracted from this component, with its dependencies, before lora_pipeline loads.

    The `kubeflow` extra: kfp (already there, at the compiling SDK's version), kfp-kubernetes, model-registry,
    kubeflow. pip keeps what the image already satisfies (torch in a CUDA image): only missing ones install.
    """
    import importlib
    import lzma
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    packed = globals().get("__KFP_EMBEDDED_ASSET_FILE")  # set by KFP's extraction helper in this module
    if not packed:
        raise RuntimeError("lora-pipeline: the component has no embedded wheel (compile it again)")
    wheel = os.path.join(tempfile.mkdtemp(prefix="lora-pipeline-wheel-"), os.path.basename(packed)[: -len(".xz")])
    with lzma.open(packed) as src, open(wheel, "wb") as dst:
        shutil.copyfileobj(src, dst)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-warn-script-location", *pip_options]
    subprocess.run([*command, wheel + "[kubeflow]"], check=True)
    os.environ["LORA_PIPELINE_WHEEL"] = wheel  # WHEEL_ENV: a multi-node train hands it on to its nodes
    importlib.invalidate_caches()


def pip_options(index_urls: tuple[str, ...], trusted_hosts: tuple[str, ...]) -> list[str]:
    """pip's index options, as KFP writes them for its own install (each index is trusted unless hosts are given)."""
    options: list[str] = []
    for i, url in enumerate(index_urls):
        options += ["--index-url" if i == 0 else "--extra-index-url", url]
    for host in trusted_hosts or (index_urls if index_urls else ()):
        options += ["--trusted-host", host]
    return options


def project_root() -> Path | None:
    """The checkout this module runs from (src layout), or None when installed from a wheel."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "lora_pipeline").is_dir() else None


def build_wheel(dest: Path) -> Path:
    """This project's wheel in `dest`: built from the checkout, else repacked from the installed distribution."""
    root = project_root()
    if root is None:
        return _repack_installed(dest)
    with tempfile.TemporaryDirectory(prefix="lora-pipeline-build-") as tmp:
        # Build from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
        src = Path(tmp) / "src"
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            if (root / name).is_file():
                src.mkdir(exist_ok=True)
                shutil.copy2(root / name, src / name)
        shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        # setuptools here: build offline with it; else pip fetches the build backend from the index
        isolation = ["--no-build-isolation"] if _has_setuptools() else []
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation, "-w", str(dest), str(src)]
        done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(dest.glob("lora_pipeline-*.whl"))
    if done.returncode or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise ConfigError(f"could not build this project's wheel from {root}: {last}", field="--package-spec")
    return wheels[-1]


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        return False
    return True


def _repack_installed(dest: Path, dist: importlib.metadata.Distribution | None = None) -> Path:
    """A wheel of the installed distribution: its files under site-packages and a fresh RECORD."""
    dist = dist or importlib.metadata.distribution("lora-pipeline")
    files = [f for f in dist.files or [] if not str(f).startswith("..") and not str(f).endswith(".pyc")]
    info = next((str(f).split("/")[0] for f in files if str(f).endswith(".dist-info/METADATA")), None)
    if info is None or not any(str(f).startswith("lora_pipeline/") for f in files):
        raise ConfigError("lora-pipeline is installed without its files (editable?): compile from the checkout, "
                          "or pass --package-spec", field="--package-spec")  # fmt: skip
    path = dest / f"lora_pipeline-{dist.version}-py3-none-any.whl"
    record = f"{info}/RECORD"
    rows = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            if str(f) in (record, f"{info}/INSTALLER", f"{info}/REQUESTED", f"{info}/direct_url.json"):
                continue
            data = Path(f.locate()).read_bytes()
            zf.writestr(str(f), data)
            rows.append(_record_row(str(f), data))
        zf.writestr(record, "\n".join([*rows, f"{record},,"]) + "\n")
    return path


POD_UNUSED = ("lora_pipeline/demo/data/", "lora_pipeline/demo/task/")  # left out of the embedded wheel


def pack_for_embedding(wheel: Path, dest: Path) -> Path:
    """`NAME.whl.xz`: the wheel stored uncompressed, then xz-compressed whole.

    Every file is the wheel's own except METADATA, which loses its long description (the README, a fifth of
    the packed size, read by no pod), the package's modules, without their comments and docstrings
    (`strip_source`: on the same lines, so a pod's tracebacks point into the repository's source), and the
    demo's data files (`lora-pipeline demo` runs on a laptop, never in a component); RECORD is rewritten to
    match, so pip verifies the wheel as usual.
    """
    stored = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stored, "w", zipfile.ZIP_STORED) as dst:
        kept = [info for info in src.infolist() if not info.filename.startswith(POD_UNUSED)]
        files = {info.filename: src.read(info) for info in kept}
        record = next(name for name in files if name.endswith(".dist-info/RECORD"))
        metadata = record[: -len("RECORD")] + "METADATA"
        files[metadata] = files[metadata].split(b"\n\n", 1)[0] + b"\n"  # headers end at the first blank line
        for name in files:
            if name.startswith("lora_pipeline/") and name.endswith(".py"):
                files[name] = strip_source(files[name].decode()).encode()
        rows = [_record_row(name, data) for name, data in files.items() if name != record]
        files[record] = "\n".join([*rows, f"{record},,"]).encode() + b"\n"
        for info in kept:
            stored_info = zipfile.ZipInfo(info.filename, info.date_time)
            stored_info.external_attr = info.external_attr
            dst.writestr(stored_info, files[info.filename], zipfile.ZIP_STORED)
    packed = dest / (wheel.name + ".xz")
    packed.write_bytes(lzma.compress(stored.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
    stored.unlink()
    return packed


_KEPT_COMMENT = re.compile(r"#!|#.*coding[:=]")  # a shebang or an encoding declaration (lines 1-2) stays


def strip_source(text: str) -> str:
    """Python source without its comments and docstrings, every line where it was (tracebacks still match).

    A comment is cut where it starts. A module's, class's or function's docstring is blanked where it has its
    lines to itself and its body another statement (a body needs one); a module that reads `__doc__` (an
    argparse description) keeps its docstrings.
    """
    lines = text.split("\n")
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        row, col = token.start
        if token.type == tokenize.COMMENT and not (row <= 2 and _KEPT_COMMENT.match(token.string)):
            lines[row - 1] = lines[row - 1][:col].rstrip()
    if "__doc__" not in text:
        for first, last in _docstring_lines(ast.parse(text), lines):
            lines[first - 1 : last] = [""] * (last - first + 1)
    stripped = "\n".join(lines)
    compile(stripped, "<stripped source>", "exec", dont_inherit=True)  # a stripper's slip fails the compile here
    return stripped


def _docstring_lines(tree: ast.Module, lines: list[str]) -> list[tuple[int, int]]:
    """The first and last line of each docstring that can go: one with its lines to itself, before more body."""
    spans = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = node.body[0]
        if len(node.body) < 2 or not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)):
            continue
        # ast's columns count UTF-8 bytes
        before = lines[doc.lineno - 1].encode()[: doc.col_offset]
        after = lines[doc.end_lineno - 1].encode()[doc.end_col_offset :]
        if isinstance(doc.value.value, str) and not before.strip() and not after.strip():
            spans.append((doc.lineno, doc.end_lineno))
    return spans


def _record_row(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


# One build per process while its sources are unchanged: a build takes seconds, and tests compile often.
_PACKED: dict[tuple, tuple[str, bytes]] = {}


def embedded_wheel(dest: Path, wheel: str = "") -> Path:
    """The `.whl.xz` to embed: from `wheel` (a .whl path) if given, else this project's own, built now."""
    key = _sources_key(wheel)
    if key in _PACKED:
        name, data = _PACKED[key]
        (dest / name).write_bytes(data)
        return dest / name
    (dest / "built").mkdir(parents=True, exist_ok=True)
    built = Path(wheel) if wheel else build_wheel(dest / "built")
    if wheel and not (built.is_file() and built.name.startswith("lora_pipeline-") and built.suffix == ".whl"):
        raise ConfigError(f"not a lora_pipeline-*.whl file: {wheel}", field="--wheel")
    packed = pack_for_embedding(built, dest)
    _PACKED[key] = (packed.name, packed.read_bytes())
    return packed


def _sources_key(wheel: str) -> tuple:
    """What the embedded wheel is made from, by name, size and modification time."""
    root = None if wheel else project_root()
    if wheel:
        files = [Path(wheel)]
    elif root is not None:
        files = [root / "pyproject.toml", *sorted((root / "src").rglob("*"))]
    else:
        files = []  # the installed distribution: it does not change under a running process
    files = [f for f in files if f.is_file() and "__pycache__" not in f.parts]
    return (wheel, str(root), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
