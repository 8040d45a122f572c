"""What a cluster needs from the compiled YAML: each component carries this project's wheel and installs it
itself from the configured index; caching, the workspace PVC and the required data URI are explicit."""

from __future__ import annotations

import base64
import gzip
import io
import json
import lzma
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import cli_exit_code
from lora_pipeline import __version__
from lora_pipeline.cli import main
from lora_pipeline.kubeflow.wheel import install_lora_pipeline, pip_options, strip_source

pytest.importorskip("kfp")

STAGES = ("prepare-dataset", "train-model", "evaluate-model", "register-model")


def _compile(tmp_path: Path, *args: str, name: str = "p.yaml") -> tuple[dict, dict, Path]:
    out = tmp_path / name
    assert main(["compile", "-o", str(out), *args]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {}), out


@pytest.fixture(scope="module")
def default_yaml(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    return _compile(tmp_path_factory.mktemp("kfp"))


def _source(pipeline: dict, stage: str) -> str:
    """The component's Python source: the arguments after KFP's program, which prints them into one file."""
    command = pipeline["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["command"]
    start = next(i for i, part in enumerate(command) if "ephemeral_component.py" in part) + 1
    return "".join(command[start:])


def _embedded(source: str) -> dict[str, bytes]:
    """The files KFP embedded in a component's source (its base64 tar.gz), by name."""
    (b64,) = re.findall(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([^']+)'", source)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(base64.b64decode(b64)))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.integration
def test_default_compile_embeds_the_wheel_in_every_component(default_yaml) -> None:
    from kfp import __version__ as kfp_version

    pipeline, _, path = default_yaml
    assert path.stat().st_size < 2**20  # a Kubernetes object holds ~1.5 MiB; the YAML stays under 1 MiB
    wheels = []
    for stage in STAGES:
        source, install = _source(pipeline, stage), pipeline["deploymentSpec"]["executors"][f"exec-{stage}"]
        # KFP's own pip installs only kfp itself; no step names a package an index lacks
        (pip_line,) = re.findall(r"pip install [^&]*", install["container"]["command"][2])
        assert re.findall(r"'([^'-][^']*)'", pip_line)[0] == "kfp==" + kfp_version
        # the component installs its wheel before it imports lora_pipeline
        assert source.index("install_lora_pipeline([])") < source.index("from lora_pipeline.kubeflow.runtime")
        files = _embedded(source)
        (name,) = files
        assert name == f"lora_pipeline-{__version__}-py3-none-any.whl.xz"
        wheels.append(files[name])
    assert len(set(wheels)) == 1  # the same wheel in all four


@pytest.mark.integration
def test_no_argument_exceeds_linuxs_limit_and_the_program_rebuilds_the_source(default_yaml, tmp_path: Path) -> None:
    """exec refuses one argument over 128 KiB (E2BIG): the source goes in parts that KFP's program rejoins."""
    pipeline, _, _ = default_yaml
    for stage in STAGES:
        command = pipeline["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]["command"]
        assert max(len(part.encode()) for part in command) < 128 * 1024
        start = next(i for i, part in enumerate(command) if "ephemeral_component.py" in part)
        assert len(command) - start > 2  # the wheel's source did need splitting
        # KFP's program as it runs in the pod, with the executor replaced by a copy of what it would load
        executor = 'executor() { cp "$2" out.py; echo "$@"; }\n_KFP_RUNTIME=true executor'
        program = command[start].replace("_KFP_RUNTIME=true python3 -m kfp.dsl.executor_main", executor)
        result = subprocess.run(["sh", "-ec", program, *command[start + 1 :], "--executor_input", "{}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-2:] == ["--executor_input", "{}"]  # the executor's own arguments follow
        assert (tmp_path / "out.py").read_text() == _source(pipeline, stage)
        assert "install_lora_pipeline" in (tmp_path / "out.py").read_text()


@pytest.mark.integration
def test_embedded_wheel_is_this_checkouts_code_and_pip_accepts_it(default_yaml, tmp_path: Path) -> None:
    pipeline, _, _ = default_yaml
    (packed,) = _embedded(_source(pipeline, "train-model")).items()
    with zipfile.ZipFile(io.BytesIO(lzma.decompress(packed[1]))) as whl:
        names = set(whl.namelist())
        src = Path(__file__).resolve().parents[1] / "src"
        for module in src.rglob("*.py"):
            arc = module.relative_to(src).as_posix()
            assert arc in names, arc
            assert whl.read(arc) == strip_source(module.read_text()).encode(), arc  # comments, docstrings gone
        assert not [n for n in names if n.startswith(("lora_pipeline/demo/data/", "lora_pipeline/demo/task/"))]
    _check_record(lzma.decompress(packed[1]))
    # The component's own bootstrap, run as KFP runs it: pip reads the wheel and its metadata.
    asset = tmp_path / packed[0]
    asset.write_bytes(packed[1])
    namespace = {"__KFP_EMBEDDED_ASSET_FILE": str(asset), "__builtins__": __builtins__}
    exec(compile(_function_source(), "<bootstrap>", "exec"), namespace)
    namespace["install_lora_pipeline"](["--dry-run", "--no-deps", "--no-index", "--quiet"])


def _function_source() -> str:
    import inspect

    return inspect.getsource(install_lora_pipeline)


def test_bootstrap_without_an_embedded_wheel_says_so() -> None:
    namespace: dict = {"__builtins__": __builtins__}
    exec(compile(_function_source(), "<bootstrap>", "exec"), namespace)
    with pytest.raises(RuntimeError, match="no embedded wheel"):
        namespace["install_lora_pipeline"]([])


@pytest.mark.parametrize(
    ("urls", "hosts", "expected"),
    [
        ((), (), []),
        (("https://m/simple",), (), ["--index-url", "https://m/simple", "--trusted-host", "https://m/simple"]),
        (
            ("https://a/s", "https://b/s"),
            ("a",),
            ["--index-url", "https://a/s", "--extra-index-url", "https://b/s", "--trusted-host", "a"],
        ),  # fmt: skip
    ],
)
def test_pip_options_follow_kfps_own(urls, hosts, expected) -> None:
    assert pip_options(urls, hosts) == expected


@pytest.mark.integration
def test_mirror_options_reach_kfps_install_and_the_wheels(tmp_path: Path) -> None:
    pipeline, _, _ = _compile(tmp_path, "--pip-index-url", "https://mirror.example/simple",
                              "--pip-trusted-host", "mirror.example")  # fmt: skip
    for stage in STAGES:
        executor = pipeline["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
        kfp_install = executor["command"][2]
        assert "--index-url https://mirror.example/simple --trusted-host mirror.example" in kfp_install
        options = ["--index-url", "https://mirror.example/simple", "--trusted-host", "mirror.example"]
        assert f"install_lora_pipeline({options!r})" in executor["command"][-1]


def test_prebuilt_image_installs_nothing_and_a_spec_is_pip_installed(tmp_path: Path) -> None:
    image, _, _ = _compile(tmp_path, "--image", "r.example/lora:1", "--package-spec", "", name="a.yaml")
    spec, _, _ = _compile(tmp_path, "--package-spec", "lora-pipeline[kubeflow]==0.1.0", name="b.yaml")
    for stage in STAGES:
        assert "pip install" not in json.dumps(image["deploymentSpec"]["executors"][f"exec-{stage}"])
        assert "install_lora_pipeline" not in _source(image, stage)
        assert "__KFP_EMBEDDED_ARCHIVE_B64" not in _source(spec, stage)
        assert "lora-pipeline[kubeflow]==0.1.0" in json.dumps(spec["deploymentSpec"]["executors"][f"exec-{stage}"])


@pytest.mark.integration
def test_given_wheel_is_embedded(tmp_path: Path, default_yaml) -> None:
    built = tmp_path / "w"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(built), str(Path(__file__).resolve().parents[1])], check=True, timeout=300)  # fmt: skip
    (wheel,) = built.glob("*.whl")
    pipeline, _, _ = _compile(tmp_path, "--wheel", str(wheel))
    given, default = (_wheel_files(_source(p, "evaluate-model")) for p in (pipeline, default_yaml[0]))
    assert given == default  # the same files (a zip's timestamps differ between builds)


def _wheel_files(source: str) -> dict[str, bytes]:
    ((_, packed),) = _embedded(source).items()
    with zipfile.ZipFile(io.BytesIO(lzma.decompress(packed))) as whl:
        return {name: whl.read(name) for name in whl.namelist()}


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--wheel", "x.whl", "--package-spec", ""], "--wheel"),
        (["--wheel", "README.md"], "--wheel"),
        (["--workspace-size", "", "--workspace-storage-class", "fast"], "--workspace-storage-class"),
        (["--pip-index-url", "https://user:pw@mirror.example/simple"], "--pip-index-url"),
    ],
)
def test_bad_install_and_workspace_options_are_one_line(tmp_path: Path, args: list[str], field: str, capsys) -> None:
    assert cli_exit_code(["compile", "-o", str(tmp_path / "p.yaml"), *args]) == 2
    stderr = capsys.readouterr().err
    assert field in stderr and "Traceback" not in stderr and len(stderr.splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def _tasks(pipeline: dict) -> dict[str, dict]:
    tasks = dict(pipeline["root"]["dag"]["tasks"])
    for component in pipeline["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return {name: t for name, t in tasks.items() if name in STAGES}


@pytest.mark.integration
def test_kfp_caching_is_off_unless_asked(default_yaml, tmp_path: Path) -> None:
    assert set(_tasks(default_yaml[0])) == set(STAGES)
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in _tasks(default_yaml[0]).values())
    cached, _, _ = _compile(tmp_path, "--kfp-cache")
    assert all(t["cachingOptions"]["enableCache"] for t in _tasks(cached).values())


@pytest.mark.integration
def test_workspace_pvc_is_explicit(default_yaml, tmp_path: Path) -> None:
    default = {"size": "20Gi", "kubernetes": {"pvcSpecPatch": {"accessModes": ["ReadWriteOnce"]}}}
    assert _workspace(default_yaml[1]) == default  # no storage class: the cluster's default StorageClass
    _, platform, _ = _compile(tmp_path, "--workspace-size", "50Gi", "--workspace-storage-class", "nfs",
                              "--workspace-access-mode", "ReadWriteMany")  # fmt: skip
    assert _workspace(platform)["size"] == "50Gi"
    assert _workspace(platform)["kubernetes"]["pvcSpecPatch"] == {
        "accessModes": ["ReadWriteMany"],
        "storageClassName": "nfs",
    }


@pytest.mark.integration
def test_multi_node_default_asks_for_read_write_many(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _compile(tmp_path, "--train.num_workers", "2")
    assert "--workspace-access-mode ReadWriteMany" in capsys.readouterr().out
    _compile(tmp_path, "--train.num_workers", "2", "--workspace-access-mode", "ReadWriteMany")
    assert "ReadWriteMany" not in capsys.readouterr().out


def _workspace(platform: dict) -> dict:
    return platform["platforms"]["kubernetes"]["pipelineConfig"]["workspace"]


@pytest.mark.integration
def test_data_uri_is_required_unless_the_config_sets_it(default_yaml, tmp_path: Path) -> None:
    declared = default_yaml[0]["root"]["inputDefinitions"]["parameters"]["phase_01_dataset_man_data_uri"]
    assert declared == {"parameterType": "STRING"}  # no default, not optional
    pipeline, _, _ = _compile(tmp_path, "--dataset.data_uri", "s3://b/d.jsonl")
    set_uri = pipeline["root"]["inputDefinitions"]["parameters"]["phase_01_dataset_man_data_uri"]
    assert set_uri["defaultValue"] == "s3://b/d.jsonl"


@pytest.mark.integration
def test_task_config_env_and_volumes_apply_to_the_training_task(default_yaml) -> None:
    passthroughs = default_yaml[0]["components"]["comp-train-model"]["taskConfigPassthroughs"]
    applied = {p["field"] for p in passthroughs if p.get("applyToTask")}
    assert {"ENV", "KUBERNETES_VOLUMES", "RESOURCES"} <= applied
    inputs = default_yaml[0]["components"]["comp-train-model"]["inputDefinitions"]["parameters"]
    assert inputs["kubernetes_config"]["parameterType"] == "TASK_CONFIG"


@pytest.mark.integration
def test_installed_distribution_repacks_to_the_same_wheel(tmp_path: Path) -> None:
    """Without a checkout (installed from a wheel), compile embeds a wheel of the installed files."""
    import importlib.metadata

    from lora_pipeline.kubeflow.wheel import _repack_installed

    built = tmp_path / "w"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(built), str(Path(__file__).resolve().parents[1])], check=True, timeout=300)  # fmt: skip
    (wheel,) = built.glob("*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)  # fmt: skip
    (info,) = target.glob("lora_pipeline-*.dist-info")
    (tmp_path / "out").mkdir()
    repacked = _repack_installed(tmp_path / "out", importlib.metadata.PathDistribution(info))
    with zipfile.ZipFile(wheel) as a, zipfile.ZipFile(repacked) as b:
        skip = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
        original = {n: a.read(n) for n in a.namelist() if not n.endswith(skip)}
        assert {n: b.read(n) for n in b.namelist() if not n.endswith(skip)} == original
    _check_record(repacked.read_bytes())
    # pip accepts it
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "-q",
                    str(repacked)], check=True, timeout=300)  # fmt: skip


def _check_record(wheel: bytes) -> None:
    """Every file of the wheel is listed in its RECORD with its sha256 and size, and nothing else is."""
    import hashlib

    with zipfile.ZipFile(io.BytesIO(wheel)) as whl:
        (record,) = [n for n in whl.namelist() if n.endswith(".dist-info/RECORD")]
        rows = {row.split(",")[0]: row.split(",")[1:] for row in whl.read(record).decode().splitlines()}
        assert set(rows) == set(whl.namelist())
        for name, (digest, size) in rows.items():
            if name != record:
                data = whl.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert (digest, size) == (f"sha256={expected}", str(len(data))), name
