"""The pipeline compiled with the defaults installs itself: kfp.local runs each task in a fresh venv where this
project is not installed, the components install their embedded wheel and its dependencies from a loopback
index (given with --pip-index-url), and the scores equal a plain `lora-pipeline run`.

The index holds this environment's own versions of every dependency (torch included: a bare venv would resolve
torch to a multi-GB CUDA build), built once into a cached wheelhouse; the project itself is not on it.
"""

from __future__ import annotations

import functools
import http.server
import importlib.metadata
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from helpers import base_url, loopback_server, run_compiled_pipeline_locally
from test_kubeflow_local import _demo_yaml, _scores

pytest.importorskip("kfp")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> list[str]:
    """name==version of every distribution here but this project: the fresh venvs get the same versions."""
    pins = {
        _normalize(d.metadata["Name"]): d.version
        for d in importlib.metadata.distributions()
        if d.metadata["Name"] and _normalize(d.metadata["Name"]) != "lora-pipeline"
    }
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def _wheelhouse(tmp_path: Path) -> tuple[Path, Path]:
    """(wheel directory, constraints file); the wheels are built once per set of pins (pip's own config)."""
    pins = _pins()
    key = _digest(pins)
    house = Path(os.environ.get("LORA_PIPELINE_WHEELHOUSE", Path.home() / ".cache/lora-pipeline/wheelhouse")) / key
    constraints = house.parent / f"{key}.constraints.txt"
    constraints.parent.mkdir(parents=True, exist_ok=True)
    constraints.write_text("\n".join(pins) + "\n")
    if not (house / ".complete").exists():
        built = tmp_path / "project-wheel"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(built),
                        str(Path(__file__).resolve().parents[1])], check=True, timeout=600)  # fmt: skip
        (project,) = built.glob("lora_pipeline-*.whl")
        wanted = [f"{project}[kubeflow]", "pip", "setuptools", "wheel"]
        wanted += [p for p in pins if p.split("==")[0] in ("kfp", "pip", "setuptools", "wheel")]
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "-c", str(constraints), "-w", str(house), *wanted],
                       check=True, timeout=1800)  # fmt: skip
        for own in house.glob("lora_pipeline-*"):
            own.unlink()  # the components must install the wheel from the YAML, not from the index
        (house / ".complete").write_text("")
    return house, constraints


def _digest(pins: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:12]


def _simple_index(house: Path, root: Path) -> Path:
    """A PEP 503 simple index over the wheelhouse: root/simple/<project>/index.html, files linked back."""
    simple = root / "simple"
    by_project: dict[str, list[Path]] = {}
    for wheel in house.glob("*.whl"):
        by_project.setdefault(_normalize(wheel.name.split("-")[0]), []).append(wheel)
    for project, wheels in by_project.items():
        (simple / project).mkdir(parents=True)
        for wheel in wheels:
            (simple / project / wheel.name).symlink_to(wheel)
        links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in wheels)
        (simple / project / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return root


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.mark.integration
def test_compiled_pipeline_installs_itself_in_fresh_venvs(
    demo_assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:

    house, constraints = _wheelhouse(tmp_path)
    root = _simple_index(house, tmp_path / "index")
    with loopback_server(functools.partial(_QuietHandler, directory=str(root))) as server:
        index = f"{base_url(server)}/simple"
        home = str(Path(demo_assets.model_dir).parents[1])
        env = {"LORA_PIPELINE_HOME": home, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        config = _demo_yaml(demo_assets, tmp_path / "demo.yaml")
        started = time.perf_counter()
        plain = run_cli("run", "-c", str(config), "-o", str(tmp_path / "run"), env=env)
        plain_seconds = time.perf_counter() - started
        assert plain.returncode == 0, plain.stderr

        compiled = tmp_path / "pipeline.yaml"  # the defaults: the wheel embedded, no --package-spec
        out = run_cli("compile", "-c", str(config), "-o", str(compiled), "--pip-index-url", index,
                      "--pip-trusted-host", "127.0.0.1")  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert compiled.stat().st_size < 2**20

        # Only the loopback index: no pip config, no find-links, no checkout on the path.
        for name in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
            monkeypatch.delenv(name, raising=False)
        for key, value in {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": index,
                           "PIP_CONSTRAINT": str(constraints)}.items():  # fmt: skip
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(tmp_path)
        kfp_root, kfp_seconds = run_compiled_pipeline_locally(compiled, tmp_path, use_venv=True)
    with capsys.disabled():
        print(f"\nwall time: plain run {plain_seconds:.1f}s, kfp.local in fresh venvs {kfp_seconds:.1f}s, "
              f"YAML {compiled.stat().st_size / 1024:.0f} KiB")  # fmt: skip
    (eval_results,) = kfp_root.rglob("eval_results.json")
    assert _scores(eval_results) == _scores(tmp_path / "run" / "eval" / "eval_results.json")
