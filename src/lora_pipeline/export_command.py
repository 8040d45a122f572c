"""`lora-pipeline export -o RUN`: a finished run's `train/adapter` exported without retraining: a merged model
(export/merged.py), a GGUF file with an Ollama Modelfile (export/gguf.py, export/ollama.py), and/or an upload
to the Hugging Face Hub. It reads the run's records and never writes them, so the run's options and stage cache
are unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_pipeline.cli_options import Once
from lora_pipeline.errors import ConfigError
from lora_pipeline.export.merged import check_repo_id, merged_model, push_folders
from lora_pipeline.files import atomic_dir, exclusive_lock
from lora_pipeline.models import load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRequest:
    run_dir: Path
    merged: bool = False
    gguf: str | None = None  # one of gguf.GGUF_TYPES
    push_to_hub: str | None = None  # repo id
    out: Path | None = None  # export root, default RUN/export
    private: bool = False


def export_run(req: ExportRequest) -> list[Path]:
    """Write what `req` asks for from the run's adapter; every input is checked before the model loads."""
    adapter = req.run_dir / "train" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"no trained adapter in {adapter} (run the train stage first)", field="-o")
    if not (req.merged or req.gguf or req.push_to_hub):
        raise ConfigError("nothing to export: give --merged, --gguf TYPE and/or --push-to-hub REPO", field="export")
    if req.private and req.push_to_hub is None:
        raise ConfigError("applies only with --push-to-hub", field="--private")
    gguf_type = None
    if req.gguf is not None:
        from lora_pipeline.export.gguf import check_gguf_type

        gguf_type = check_gguf_type(req.gguf)
    if req.push_to_hub is not None:
        check_repo_id(req.push_to_hub)
    root = req.out or req.run_dir / "export"
    _check_out(root, req.run_dir)
    base_ref, trust = _base_of(req.run_dir, adapter)
    with exclusive_lock(req.run_dir / ".lock", what=f"run directory {req.run_dir}"):
        written: list[Path] = []
        if req.merged or gguf_type:
            written += _write_exports(base_ref, adapter, root, req.merged, gguf_type, trust)
        if req.push_to_hub is not None:
            push_folders(req.push_to_hub, written or [adapter], private=req.private)
    return written


def _write_exports(
    base_ref: str, adapter: Path, root: Path, merged: bool, gguf_type: str | None, trust: bool
) -> list[Path]:
    model = merged_model(base_ref, adapter, trust)
    tokenizer = load_tokenizer(str(adapter), trust)
    written = []
    if merged:
        with atomic_dir(root / "merged") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        log.info("export: merged model -> %s", root / "merged")
        written.append(root / "merged")
    if gguf_type:
        from lora_pipeline.export.gguf import write_gguf
        from lora_pipeline.export.ollama import modelfile

        out = root / f"gguf-{gguf_type}"
        with atomic_dir(out) as tmp:
            write_gguf(model, tokenizer, tmp / "model.gguf", gguf_type, name=Path(base_ref).name)
            (tmp / "Modelfile").write_text(modelfile(tokenizer), encoding="utf-8")
        log.info("export: GGUF %s + Ollama Modelfile -> %s", gguf_type, out)
        written.append(out)
    return written


def _base_of(run_dir: Path, adapter: Path) -> tuple[str, bool]:
    """The base model the adapter records (an absolute path or a hub id), and the run's trust_remote_code."""
    from lora_pipeline.models import adapter_base

    base = adapter_base(adapter, field="-o")  # its config and weights load, before minutes of merging
    trust = False
    if (run_dir / "run.json").is_file():
        from lora_pipeline.pipeline import recorded_config

        trust = bool(((recorded_config(run_dir) or {}).get("train") or {}).get("trust_remote_code", False))
    return base, trust


def _check_out(root: Path, run_dir: Path) -> None:
    """An unwritable export folder is found before minutes of merging, not after; one inside a stage's output
    would change that stage's recorded outputs (and so its cache)."""
    from lora_pipeline.stages import STAGES

    for stage in STAGES:
        if root.resolve().is_relative_to((run_dir / stage.name).resolve()):
            raise ConfigError(f"{root} is inside the {stage.name} stage's output; export elsewhere", field="--out")
    probe = root
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{probe} is not a directory", field="--out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {probe}", field="--out")


def add_export_command(sub: Any) -> None:
    """`export -o RUN [--merged] [--gguf TYPE] [--push-to-hub REPO] [--out DIR]` (argparse only)."""
    p = sub.add_parser(
        "export",
        help="Export a finished run's adapter: merged model, GGUF + Ollama Modelfile, Hugging Face Hub",
        description="Write exports from RUN/train/adapter without retraining; the run's options and cache are "
        "unchanged. Outputs go to RUN/export/merged and RUN/export/gguf-TYPE (or under --out).",
        usage="lora-pipeline export -o RUN_DIR [--merged] [--gguf TYPE] [--push-to-hub REPO] [--out DIR]",
    )
    p.add_argument(
        "-o", "--run_dir", required=True, metavar="DIR", action=Once, help="The run directory holding train/adapter"
    )
    p.add_argument("--merged", action="store_true", help="Merged full-precision safetensors model (OUT/merged)")
    p.add_argument(
        "--gguf",
        default=None,
        action=Once,
        metavar="TYPE",
        help="GGUF file + Ollama Modelfile (OUT/gguf-TYPE): f16, bf16, q8_0 or q4_0 "
        "(K-quants: run llama.cpp's llama-quantize on the f16 file)",
    )
    p.add_argument(
        "--push-to-hub",
        dest="push_to_hub",
        default=None,
        action=Once,
        metavar="REPO",
        help="Upload the exports (the adapter if none) to this Hub model repo; token from HF_TOKEN, "
        "endpoint from HF_ENDPOINT",
    )
    p.add_argument("--private", action="store_true", help="With --push-to-hub: create the repo private")
    p.add_argument("--out", default=None, metavar="DIR", action=Once, help="Export folder (default: RUN_DIR/export)")


def export_command(args: Any) -> int:
    req = ExportRequest(
        run_dir=Path(args.run_dir),
        merged=args.merged,
        gguf=args.gguf,
        push_to_hub=args.push_to_hub,
        out=Path(args.out) if args.out else None,
        private=args.private,
    )
    for path in export_run(req):
        print(f"export: {path}")
    if req.push_to_hub:
        print(f"export: pushed to {req.push_to_hub}")
    return 0
