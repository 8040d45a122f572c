"""Pre-flight: every check that needs no training, run in seconds before any stage starts.

Each failure is one ConfigError naming the field. Nothing here writes outside a temp probe file, so a
run that fails pre-flight leaves no trace on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from lora_pipeline import stages as table
from lora_pipeline.config import Config, RegistryConfig, is_local_uri, local_path
from lora_pipeline.errors import ConfigError, RegistryError
from lora_pipeline.sources import MODEL_SCHEMES
from lora_pipeline.stages import resolve
from lora_pipeline.stages.outputs import ADAPTER, EVAL_RESULTS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checking:
    """What a stage's pre-flight check knows besides the config: the command it is part of."""

    stages: frozenset[str]  # the stages this command runs
    out: Path  # the run directory (`-o`) or the stage's output directory (`--out`)
    out_field: str  # "-o" or "--out"
    check_source: bool  # the data source may be read (its credentials are at hand)

    @property
    def run_dir(self) -> Path | None:
        return Path(self.out) if self.out_field == "-o" else None


def preflight(
    config: Config, stages: Iterable[str], out: Path, out_field: str, check_source: bool = True
) -> str | None:
    """Run the checks that the given stages declare, in table order; returns the data source's fingerprint
    (or None)."""
    checking = Checking(frozenset(stages), Path(out), out_field, check_source)
    check_output_dir(out, out_field)
    fingerprint = None
    for stage in table.STAGES:
        if stage.name in checking.stages and stage.check:
            fingerprint = resolve(stage.check)(config, checking) or fingerprint
    return fingerprint


def check_dataset_stage(config: Config, checking: Checking) -> str | None:
    """A dataset location; the source's fingerprint, read here so that an unreachable source fails now."""
    if not config.dataset.data_uri and not config.dataset.sources:
        raise ConfigError("required: a dataset location (or use `lora-pipeline demo`)", field="dataset.data_uri")
    if not checking.check_source:
        return None
    from lora_pipeline.data import mixing

    return mixing.fingerprint(config.dataset)


def check_train_stage(config: Config, checking: Checking) -> None:
    from lora_pipeline.chat_templates import check_chat_template
    from lora_pipeline.training.arguments import check_train_options

    train = config.train
    # eval rows come from the dataset stage's split when it runs here; else train finds out from its input
    check_train_options(train, _eval_rows(config, checking))
    check_model(train.model)
    check_model_fits(config)
    check_chat_template(train.chat_template, train.model, _model_files(train.model), config.dataset.format)
    if train.data_output_dir:
        check_output_dir(Path(train.data_output_dir), "train.data_output_dir")


def check_eval_stage(config: Config, checking: Checking) -> None:
    from lora_pipeline.evaluation.checks import SPLIT_TASK
    from lora_pipeline.stages.evaluate import check_eval_options

    check_eval_options(config.eval)
    if SPLIT_TASK in config.eval.tasks and _eval_rows(config, checking) is False:
        raise ConfigError(
            f"task {SPLIT_TASK!r} scores the dataset stage's held-out rows, and dataset.data_split 1.0 holds none "
            "out: set it below 1 (or dataset.eval_uri)",
            field="eval.tasks",
        )


def _eval_rows(config: Config, checking: Checking) -> bool | None:
    """Whether the dataset stage of this command writes eval rows (a separate eval set, or a split below 1);
    None when it does not run here (its output says)."""
    if "dataset" not in checking.stages:
        return None
    return bool(config.dataset.eval_uri) or config.dataset.data_split < 1.0


def check_register_stage(config: Config, checking: Checking) -> None:
    from lora_pipeline.registry import check_local, token

    registry, run_dir = config.registry, checking.run_dir
    check_registry(registry.address, registry.port, token(registry), registry.ca_cert)
    # a run directory: its adapter is known before training
    check_local(registry, run_dir / "train" / ADAPTER if run_dir else None)
    if run_dir and "eval" not in checking.stages:
        check_eval_completed(registry, run_dir)


def check_output_dir(path: Path, field: str) -> None:
    """The output directory is a directory (or can become one) that this process can write into."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"not a directory: {path}", field=field)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"cannot create {path}: {probe} is a file, not a directory", field=field)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".lora-pipeline-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(f"cannot write to {probe}: {exc.strerror or exc}", field=field) from None


def check_model(ref: str, field: str = "train.model") -> None:
    """The base model resolves to a config, a tokenizer and intact weights, locally or in the HF cache/Hub,
    or (s3://, oci://) it resolves with the credentials at hand."""
    if ref.startswith(MODEL_SCHEMES):
        from lora_pipeline import sources

        sources.model_fingerprint(ref)
        return
    path = Path(local_path(ref))
    if is_local_uri(ref) and (path.exists() or ref.startswith((".", "/", "~", "file://"))):
        _check_local_model(path, field)
    else:
        _check_hub_model(ref, field)


def check_model_fits(config: Config) -> None:
    """The base model's parts agree and the train options fit it (see model_checks), for a model whose files
    are here: a local directory or one in the Hugging Face cache. An s3:// or oci:// model is checked once fetched."""
    ref = config.train.model
    if ref.startswith(MODEL_SCHEMES):
        return
    path = Path(local_path(ref))
    if not (is_local_uri(ref) and path.is_dir()):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json") if _HUB_ID.match(ref) else None
        if not isinstance(cached, str):
            return  # fetched by the train stage; transformers checks it there
        path = Path(cached).parent
    from lora_pipeline.model_checks import check_model_agrees

    check_model_agrees(config.train, path)


def _model_files(ref: str) -> Path | None:
    """The directory holding a base model's files, when they are here (local, or in the Hugging Face cache)."""
    if ref.startswith(MODEL_SCHEMES):
        return None
    path = Path(local_path(ref))
    if is_local_uri(ref) and path.is_dir():
        return path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(ref, "config.json") if _HUB_ID.match(ref) else None
    return Path(cached).parent if isinstance(cached, str) else None


def _check_local_model(path: Path, field: str) -> None:
    if not path.exists():
        raise ConfigError(f"no such model directory: {path}", field=field)
    if not path.is_dir():
        raise ConfigError(f"expected a model directory, got a file: {path}", field=field)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"no model config (config.json) in {path}", field=field)
    try:
        model_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{config_file} is not valid JSON: {exc}", field=field) from None
    if not isinstance(model_config, dict) or "model_type" not in model_config:
        raise ConfigError(f"{config_file} has no model_type: not a transformers model config", field=field)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"no tokenizer in {path} (expected one of {', '.join(TOKENIZER_FILES)})", field=field)
    weights = [p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise ConfigError(f"no weights in {path} (*.safetensors or *.bin)", field=field)
    for weight in weights:
        if weight.suffix == ".safetensors":
            _check_safetensors(weight, field)


def _check_safetensors(path: Path, field: str) -> None:
    """Header length + JSON header + data size: catches truncated or corrupt files without loading them."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8:
                raise ValueError
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{path} is not a valid safetensors file (corrupt header)", field=field) from None
    if 8 + n + end != size:
        raise ConfigError(f"{path} is truncated or corrupt: {size} bytes, expected {8 + n + end}", field=field)


def _check_hub_model(ref: str, field: str) -> None:
    if not _HUB_ID.match(ref):
        raise ConfigError(f"not a local model directory nor a Hugging Face model id: {ref!r}", field=field)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    cached = {name: try_to_load_from_cache(ref, name) for name in ("config.json", *TOKENIZER_FILES[:2])}
    if isinstance(cached["config.json"], str):
        if not any(isinstance(cached[name], str) for name in TOKENIZER_FILES[:2]):
            raise ConfigError(f"{ref!r} is in the Hugging Face cache without a tokenizer", field=field)
        return
    if HF_HUB_OFFLINE:
        raise ConfigError(f"{ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set", field=field)
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(ref, timeout=10)
    except GatedRepoError:
        raise ConfigError(f"{ref!r} is gated: accept its terms on the Hub and set HF_TOKEN", field=field) from None
    except RepositoryNotFoundError:
        raise ConfigError(f"no model {ref!r} on the Hugging Face Hub (or HF_TOKEN lacks access)", field=field) from None
    except Exception as exc:  # network errors come in many types (requests, httpx, OSError)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ConfigError(
            f"cannot reach the Hugging Face Hub to find {ref!r} ({reason}); "
            "use a local directory, or HF_HUB_OFFLINE=1 with the model in the HF cache",
            field=field,
        ) from None


def check_eval_completed(cfg: RegistryConfig, run_dir: Path) -> None:
    """`register -o RUN` registers scores: the run's last eval must have completed, unless
    registry.allow_no_eval. A failed eval leaves an older eval's results behind, so run.json decides."""
    from lora_pipeline.registry import kind

    if cfg.allow_no_eval or kind(cfg) == "none":
        return
    try:
        status = json.loads((run_dir / "run.json").read_text())["stages"]["eval"]["status"]
    except (OSError, ValueError, KeyError, TypeError):
        status = None  # no run record (a run directory put together by hand): the results file decides
    results = run_dir / "eval" / EVAL_RESULTS
    if status not in (None, "ran", "cached") or not results.is_file():
        state = f"its last eval {status}" if status not in (None, "ran", "cached") else f"no {results.name}"
        raise ConfigError(
            f"no completed eval in {run_dir} ({state}): run `lora-pipeline eval -o RUN_DIR` first, or set "
            "--registry.allow_no_eval true to register a version without scores",
            field="registry.allow_no_eval",
        )


def check_ca_cert(path: str) -> None:
    """registry.ca_cert is a PEM bundle ssl can load: else the first https request fails with ssl's own
    error, outside any check (a traceback), and only once the registry is reachable."""
    import ssl

    from lora_pipeline.models import first_line

    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:  # a file without a certificate in it
        reason = f"not a PEM certificate bundle ({exc.reason or first_line(exc)})"
        raise ConfigError(f"cannot load a CA bundle from {path}: {reason}", field="registry.ca_cert") from None
    except (OSError, ValueError) as exc:  # a missing file, a directory
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        raise ConfigError(f"cannot load a CA bundle from {path}: {reason}", field="registry.ca_cert") from None


def check_registry(address: str, port: int, token: str = "", ca_cert: str = "") -> None:
    """Empty/`local` (the local registry file) and `none` (no registration) reach nothing. Any other address
    is a Kubeflow Model Registry: it must answer on its port, over https it needs a token, and it must serve
    a Model Registry API version that lora-pipeline speaks (v1 or v1alpha3)."""
    if ca_cert:
        check_ca_cert(ca_cert)
    if address.strip().lower() in ("", "local", "none"):
        return
    import importlib.util

    from lora_pipeline.registry.kubeflow import INSTALL_HINT, normalise_address

    if importlib.util.find_spec("model_registry") is None:
        raise ConfigError(INSTALL_HINT, field="registry.address")
    url, port = normalise_address(address, port)
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ConfigError(f"not a host name or URL: {address!r}", field="registry.address")
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"cannot connect to {host}:{port} ({reason})", field="registry.address") from None
    # The client refuses https without a token; in a pod it falls back to the service account's.
    service_account = os.environ.get(
        "KF_PIPELINES_SA_TOKEN_PATH", "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )
    if parts.scheme == "https" and not token and not Path(service_account).is_file():
        raise ConfigError(
            f"{url} is https: set --registry.token or MODEL_REGISTRY_TOKEN (http:// for a registry without auth)",
            field="registry.token",
        )
    from lora_pipeline.registry import mr_api

    base = f"{parts.scheme}://{host}:{port}"
    try:
        mr_api.detect(base, token, ca_cert, timeout=10)
    except ConnectionError as exc:  # up but not answering yet: register retries it, within registry.timeout
        log.warning("pre-flight: the Model Registry at %s did not answer (%s); register will retry", base, exc)
    except RegistryError as exc:
        raise ConfigError(str(exc).removeprefix(f"{exc.field}: "), field=exc.field) from None
