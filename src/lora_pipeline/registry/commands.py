"""`lora-pipeline models list|show|delete`: what the local registry holds, as text; `show` verifies the content,
`delete` removes a version and the copies only it used."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lora_pipeline.errors import RegistryError
from lora_pipeline.redaction import scrub
from lora_pipeline.registry.artifacts import DIGEST_KEY, verify
from lora_pipeline.registry.local import LocalRegistry

# Lineage fields of `models show`, in reading order: (label, metadata keys shown on that line).
_LINEAGE = (
    ("base model", ("base_model",)),
    ("dataset", ("dataset_uri",)),
    ("dataset sha256", ("dataset_sha256",)),
    ("dataset rows", ("dataset_train_rows", "dataset_eval_rows")),
    ("LoRA", ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "use_rslora", "use_dora")),
    ("quantization", ("quantization",)),
    ("training", ("epochs", "steps", "effective_batch_size")),
    ("losses", ("final_loss", "mean_loss", "train_loss", "eval_loss")),  # train_loss: the mean, older versions
)


def main_score(metadata: dict[str, Any]) -> str:
    """The first eval score (tuned), as `task.metric 0.9100`; '-' when the version was not evaluated."""
    for key, value in metadata.items():
        if key.startswith("eval.") and not key.endswith((".base", ".delta")):
            return f"{key[5:]} {_value(value)}"
    return "-"


def list_models(path: Path) -> str:
    rows = LocalRegistry(path).versions()
    if not rows:
        return f"no models registered in {path}"
    table = [("name", "version", "base model", "registered", "score")]
    for r in rows:
        meta = r["metadata"]
        table.append((r["model"], r["version"], str(meta.get("base_model", "-")), r["created"][:16], main_score(meta)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table]
    return "\n".join(lines) + f"\n\n({len(rows)} version{'s' if len(rows) != 1 else ''} in {path})"


def show_model(path: Path, name: str, version: str | None = None) -> str:
    r = LocalRegistry(path).version(name, version)
    meta = dict(r["metadata"])
    lines = [
        f"{r['model']} {r['version']}  (registered {r['created']} by {r['author'] or '-'})",
        f"  {'adapter':<15} {r['uri']}  [{r['format_name']} {r['format_version']}]",
    ]
    for extra in LocalRegistry(path).artifacts(r["version_id"]):  # the merged model (train.merge)
        label, changed = extra["name"][len(r["model"]) + 1 :] or extra["name"], verify(extra["uri"], extra["digest"])
        lines.append(f"  {label:<15} {extra['uri']}  [{extra['format_name']} {extra['format_version']}]")
        lines.append(f"  {'':<15} sha256 {extra['digest']}  {'CHANGED' if changed else 'OK'}")
    digest = meta.pop(DIGEST_KEY, None)
    if digest:
        lines.append(f"  {'content':<15} sha256 {digest}  {'CHANGED' if verify(r['uri'], digest) else 'OK'}")
    else:
        lines.append(f"  {'content':<15} not verified (registered before digests were recorded)")
    if r["description"]:
        lines.append(f"  {'description':<15} {r['description']}")
    for label, keys in _LINEAGE:
        parts = [(k, meta.pop(k)) for k in keys if k in meta]
        if not parts:
            continue
        text = _value(parts[0][1]) if len(parts) == 1 else ", ".join(f"{_short(k)}={_value(v)}" for k, v in parts)
        lines.append(f"  {label:<15} {text}")
    scores = [k for k in meta if k.startswith("eval.") and not k.endswith((".base", ".delta"))]
    if scores:
        lines.append(f"  {'eval':<15} {'task.metric':<30} {'base':>8} {'tuned':>8} {'delta':>8}")
        for key in scores:
            base, delta = meta.get(f"{key}.base"), meta.get(f"{key}.delta")
            delta_text = "-" if delta is None else f"{delta:+.4f}"
            lines.append(f"  {'':<15} {key[5:]:<30} {_value(base):>8} {_value(meta[key]):>8} {delta_text:>8}")
    lines.append(f"  {'ids':<15} model {r['model_id']}, version {r['version_id']}, artifact {r['artifact_id']}")
    return "\n".join(lines)


def delete_model(path: Path, name: str, version: str) -> str:
    """Remove one version; says what went (the copies of its files that no other version shares)."""
    removed = LocalRegistry(path).delete(name, version)
    kept = "" if removed else " (its files are shared with another version, or were not copies: kept)"
    freed = "".join(f"\n  removed {p}" for p in removed)
    return f"deleted {name} {version} from {path}{kept}{freed}"


def verify_model(path: Path, name: str, version: str | None = None) -> None:
    """Raise one line when a version's files no longer have the digest recorded at registration."""
    r = LocalRegistry(path).version(name, version)
    digest = r["metadata"].get(DIGEST_KEY)
    problem = verify(r["uri"], digest) if digest else None
    if problem:
        raise RegistryError(f"{r['model']} {r['version']}: {problem}", field="models")


def _short(key: str) -> str:
    if key == "train_loss":  # older versions' name for the mean over the run
        return "mean_loss"
    for prefix in ("dataset_", "lora_"):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def add_models_command(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """`models list` / `models show NAME [VERSION]` / `models delete NAME VERSION`: the local registry
    (`--registry.address local`)."""
    p = sub.add_parser(
        "models", help="List, show or delete the models in the local registry", description=add_models_command.__doc__
    )
    p.add_argument(
        "--path",
        default=None,
        metavar="FILE",
        help="Registry file (default: $LORA_PIPELINE_REGISTRY, else $LORA_PIPELINE_HOME/registry.db, "
        "else ~/.local/share/lora-pipeline/registry.db)",
    )
    what = p.add_subparsers(dest="models_command", metavar="list|show|delete", parser_class=parser_class, required=True)
    what.add_parser("list", help="Every registered version: name, version, base model, date, main score")
    show = what.add_parser("show", help="One version's lineage: base model, dataset, LoRA settings, losses, scores")
    show.add_argument("name")
    show.add_argument("version", nargs="?", default=None, help="default: the latest registered version")
    delete = what.add_parser("delete", help="Remove a version, and the adapter copies that only it used")
    delete.add_argument("name")
    delete.add_argument("version")


def models_command(args: argparse.Namespace) -> int:
    """`models list|show|delete`: the local registry's contents."""
    from lora_pipeline.registry import local_path

    path = Path(args.path).expanduser() if args.path else local_path()
    # scrubbed: a registry written before its free text was scrubbed may hold a URI's credentials
    if args.models_command == "list":
        print(scrub(list_models(path)))
    elif args.models_command == "delete":
        print(scrub(delete_model(path, args.name, args.version)))
    else:
        print(scrub(show_model(path, args.name, args.version)))
        verify_model(path, args.name, args.version)  # files changed since registration: one line, exit 2
    return 0
