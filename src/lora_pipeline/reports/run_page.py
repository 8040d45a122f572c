"""RUN_DIR/report.html: one offline page for a whole run, built from the files the stages wrote.

Stages, timings, config (with the spec's KFP names), dataset counts and dropped rows, the loss chart,
base vs tuned scores with a few sample predictions, and the registration. Plain HTML + inline SVG and
CSS: no script, font or URL is loaded, so it opens from an artifact store or a laptop offline. Every
section tolerates a missing input (a stage that failed or never ran) and says so.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Any

from lora_pipeline import stages as table
from lora_pipeline.config import SECTIONS, fields_of
from lora_pipeline.files import read_json, write_text_atomic
from lora_pipeline.reports.loss_chart import CSS as CHART_CSS
from lora_pipeline.reports.loss_chart import render_loss_chart
from lora_pipeline.stages import resolve
from lora_pipeline.stages.outputs import DATASET_RECORD, EVAL_RESULTS, METRICS, REGISTRATION

SAMPLES_SHOWN = 4
CSS = (
    CHART_CSS
    + """
main{max-width:1080px}h2{font-size:16px;margin:28px 0 10px;padding-top:12px;border-top:1px solid #e2e8f0}
h3{font-size:14px;margin:16px 0 6px;color:#334155}
table.t{border-collapse:collapse;font-size:13px;margin:4px 0 8px;width:auto}
table.t th,table.t td{padding:4px 10px;border-bottom:1px solid #e2e8f0;text-align:left;vertical-align:top}
table.t td.n,table.t th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.t th{color:#64748b;font-weight:600;background:#f8fafc}
.k{color:#64748b;font-size:12px}.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.set{font-weight:600}.up{color:#15803d;font-weight:600}.down{color:#b91c1c;font-weight:600}
.ok{color:#15803d}.bad{color:#b91c1c}.muted{color:#64748b}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;font-size:12px;font-weight:600;background:#e2e8f0}
.badge.completed,.badge.ran,.badge.registered,.badge.exists{background:#dcfce7;color:#166534}
.badge.cached,.badge.skipped{background:#e0f2fe;color:#075985}
.badge.failed,.badge.interrupted{background:#fee2e2;color:#991b1b}.badge.running{background:#fef9c3;color:#854d0e}
td.text{max-width:420px;white-space:pre-wrap;word-break:break-word}
.chart h1{display:none}table.t td .opt{white-space:nowrap}
"""
)


def write_run_report(run_dir: Path) -> Path:
    """Render RUN_DIR/report.html from run.json and the stage folders; returns its path."""
    run_dir = Path(run_dir)
    return write_text_atomic(render_run_report(run_dir), run_dir / "report.html")


def render_run_report(run_dir: Path) -> str:
    run_dir = Path(run_dir)
    manifest = _load(run_dir / "run.json") or {}
    title = f"lora-pipeline run: {run_dir.name}"
    parts = [f"<h1>{_e(title)}</h1>", _overview(manifest), _section("Stages", _stages(manifest))]
    for stage in table.STAGES:  # each stage's own section, rendered from its output directory
        if stage.report:
            heading, render = stage.report
            parts.append(_section(heading, resolve(render)(run_dir / stage.name)))
    parts.append(_section("Config", _config(manifest.get("config") or {})))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n"
    )


# --- sections -----------------------------------------------------------------------------------------


def _overview(manifest: dict[str, Any]) -> str:
    status = manifest.get("status", "unknown")
    versions = manifest.get("versions") or {}
    cells = [
        ("status", f'<span class="badge {_e(status)}">{_e(status)}</span>'),
        ("started", _e(manifest.get("started", "—"))),
        ("finished", _e(manifest.get("finished", "—"))),
        ("run directory", f'<span class="mono">{_e(manifest.get("run_dir", "—"))}</span>'),
        ("versions", _e(", ".join(f"{k} {v}" for k, v in versions.items()) or "—")),
    ]
    return _kv(cells)


def _stages(manifest: dict[str, Any]) -> str:
    rows = []
    for stage in table.STAGES:
        info = manifest.get("stages", {}).get(stage.name)
        if info is None:
            rows.append([_e(stage.name), '<span class="muted">not run</span>', "", ""])
            continue
        status = info.get("status", "?")
        seconds = info.get("seconds")
        rows.append(
            [
                _e(stage.name),
                f'<span class="badge {_e(status)}">{_e(status)}</span>',
                f"{seconds:.1f}s" if isinstance(seconds, (int, float)) else "",
                _e(info.get("error", "")),
            ]
        )
    return _table(["stage", "status", "seconds", "error"], rows, numeric={2})


def dataset_section(out: Path) -> str:
    info = _load(out / DATASET_RECORD)
    if not info:
        return _missing(out.name)
    counts = [
        ("source", f'<span class="mono">{_e(info.get("source", "—"))}</span>'),
        ("sha256", f'<span class="mono">{_e(info.get("sha256", "—"))}</span>'),
        ("files", _e(", ".join(info.get("files") or []) or "—")),
        ("formats", _e(json.dumps(info.get("formats"))) if info.get("formats") else "—"),
    ]
    numbers = [(k.replace("_", " "), _n(info.get(k))) for k in ("rows_read", "rows_valid", "rows_used")]
    numbers += [("train rows", _n(info.get("train_rows"))), ("eval rows", _n(info.get("eval_rows")))]
    dropped = info.get("dropped") or {}
    if dropped:
        rows = [
            [_e(reason), _n(d.get("count")), _e(", ".join(map(str, (d.get("first_rows") or [])[:5])))]
            for reason, d in sorted(dropped.items(), key=lambda item: -(item[1].get("count") or 0))
        ]
        drops = "<h3>Dropped rows by reason</h3>" + _table(["reason", "rows", "first rows"], rows, numeric={1})
    else:
        drops = '<p class="muted">No row was dropped.</p>'
    return _kv(counts) + _cards(numbers) + drops


def training_section(out: Path) -> str:
    metrics = _load(out / METRICS)
    if not metrics:
        return _missing(out.name)
    seconds = metrics.get("train_seconds")
    # First/last/min loss and steps are on the chart's own cards below.
    cards = [
        ("final loss", _f(metrics.get("final_loss"))),
        ("mean loss (whole run)", _f(metrics.get("mean_loss", metrics.get("train_loss")))),
        ("epochs", _n(metrics.get("epochs"))),
        ("effective batch", _n(metrics.get("effective_batch_size"))),
        ("tokens/s", _n(metrics.get("tokens_per_second"))),
        ("train time", f"{seconds:.0f}s" if isinstance(seconds, (int, float)) else "—"),
        ("device", _e(metrics.get("device", "—"))),
        ("processes", _n(metrics.get("world_size"))),
        ("padding", _share((metrics.get("batching") or {}).get("padding_share"))),
        ("peak RSS (process)", _mib(((metrics.get("memory") or {}).get("peak") or {}).get("rss_peak_bytes"))),
        ("expected for training", _mib(((metrics.get("memory") or {}).get("estimate") or {}).get("total"))),
    ]
    warnings = "".join(f'<p class="bad">{_e(w)}</p>' for w in metrics.get("warnings") or [])
    # The train stage's chart page, minus its own page frame: cards, loss + learning-rate panels, data table.
    chart = render_loss_chart(metrics.get("history") or [], title="loss")
    body = chart[chart.index("<main>") + len("<main>") : chart.rindex("</main>")]
    return _cards(cards) + warnings + f'<div class="chart">{body}</div>'


def _share(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "—"


def _mib(value: Any) -> str:
    return f"{value / 2**20:,.0f} MiB" if isinstance(value, (int, float)) else "—"


def evaluation_section(eval_dir: Path) -> str:
    results = _load(eval_dir / EVAL_RESULTS)
    if not results:
        return _missing(eval_dir.name)
    rows = []
    for r in results.get("comparison", []):
        delta = r.get("delta")
        css = "up" if isinstance(delta, (int, float)) and delta > 0 else "down" if delta else ""
        rows.append(
            [
                _e(r.get("task")),
                _e(r.get("metric")),
                _e(r.get("filter")),
                _e(r.get("precision", "")),
                _pm(r.get("base"), r.get("base_stderr")),
                _pm(r.get("tuned"), r.get("tuned_stderr")),
                f'<span class="{css}">{_e(f"{delta:+.4f}") if isinstance(delta, (int, float)) else "—"}</span>',
            ]
        )
    head = ["task", "metric", "filter", "precision", "base ± stderr", "tuned ± stderr", "delta"]
    parts = [_table(head, rows, numeric={4, 5, 6})]
    for name, samples in _sample_pairs(eval_dir / "samples"):
        parts.append(f"<h3>Sample predictions: {_e(name)}</h3>" + samples)
    return "".join(parts)


def registration_section(out: Path) -> str:
    record = _load(out / REGISTRATION)
    if not record:
        return _missing(out.name)
    status = record.get("status", "?")
    cells = [
        ("status", f'<span class="badge {_e(status)}">{_e(status)}</span> {_e(record.get("reason", ""))}'),
        ("model", f"{_e(record.get('model_name'))} <b>{_e(record.get('version'))}</b>"),
        ("registry", _e(f"{record.get('registry_kind', '')} {record.get('registry', '')}".strip() or "—")),
        ("adapter", f'<span class="mono">{_e(record.get("uri"))}</span>'),
        ("format", _e(f"{record.get('model_format_name')} {record.get('model_format_version')}")),
    ]
    ids = [record.get(k) for k in ("registered_model_id", "model_version_id", "model_artifact_id")]
    if any(ids):
        cells.append(("ids", _e(f"model {ids[0]}, version {ids[1]}, artifact {ids[2]}")))
    return _kv(cells)


def _config(config: dict[str, dict[str, Any]]) -> str:
    """Options set off their default first (what this run chose), then every option, per section."""
    if not config:
        return '<p class="muted">No config recorded.</p>'
    changed, everything = [], []
    for section, cls in SECTIONS.items():
        values, defaults = config.get(section, {}), dataclasses.asdict(cls())
        rows = []
        for f in fields_of(section):
            value = values.get(f.name, defaults.get(f.name))
            is_set = value != defaults.get(f.name)
            text = f'<span class="{"set" if is_set else ""}">{_e(_show(value))}</span>'
            option = f"<span class='mono opt'>--{section}.{f.name}</span>"
            row = [option, text, f"<span class='k'>{_e(_spec(f))}</span>"]
            rows.append(row)
            if is_set:
                changed.append(row)
        everything.append(
            f"<details><summary>{section} ({len(rows)} options)</summary>"
            + _table(["option", "value", "spec name"], rows)
            + "</details>"
        )
    head = "<h3>Set for this run (differs from the default)</h3>"
    chosen = _table(["option", "value", "spec name"], changed) if changed else '<p class="muted">All defaults.</p>'
    return head + chosen + "<h3>All options</h3>" + "".join(everything)


# --- sample predictions -------------------------------------------------------------------------------


def _sample_pairs(samples_dir: Path) -> list[tuple[str, str]]:
    """(task, table) for each tuned samples file that has a base twin: the first docs side by side."""
    out = []
    for tuned_file in sorted(samples_dir.glob("tuned_*.jsonl")) if samples_dir.is_dir() else []:
        name = tuned_file.stem.removeprefix("tuned_")
        base_file = samples_dir / f"base_{name}.jsonl"
        tuned = _head_jsonl(tuned_file, SAMPLES_SHOWN)
        base = {r.get("doc_id"): r for r in _head_jsonl(base_file, SAMPLES_SHOWN * 4)} if base_file.exists() else {}
        rows = []
        for t in tuned:
            b = base.get(t.get("doc_id"), {})
            target = _target(t)
            rows.append(
                [
                    _e(t.get("doc_id")),
                    f'<span class="text">{_e(_prompt(t))}</span>',
                    _e(target),
                    _mark(_prediction(b), target) if b else "—",
                    _mark(_prediction(t), target),
                ]
            )
        if rows:
            out.append((name, _table(["doc", "input", "target", "base", "tuned"], rows, text_cols={1})))
    return out


def _head_jsonl(path: Path, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if len(rows) >= n:
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _choices(sample: dict[str, Any]) -> list[str] | None:
    """Multiple-choice tasks: lm-eval's arguments are (context, continuation) pairs, one per choice."""
    args = sample.get("arguments")
    if isinstance(args, list) and len(args) > 1 and all(isinstance(a, list) and len(a) == 2 for a in args):
        return [str(a[1]) for a in args]
    return None


def _prompt(sample: dict[str, Any]) -> str:
    doc = sample.get("doc")
    if isinstance(doc, dict):
        for key in ("question", "query", "prompt", "input", "sentence", "text"):
            if isinstance(doc.get(key), str):
                return _clip(doc[key])
    args = sample.get("arguments")
    if isinstance(args, list) and args and isinstance(args[0], list) and args[0]:
        return _clip(str(args[0][0]))
    return f"(row {sample.get('doc_id')})"


def _target(sample: dict[str, Any]) -> str:
    target, choices = sample.get("target"), _choices(sample)
    if choices and isinstance(target, int) and 0 <= target < len(choices):
        return choices[target].strip()
    if choices and isinstance(target, str) and target.isdigit() and int(target) < len(choices):
        return choices[int(target)].strip()
    return _clip(str(target), 80)


def _prediction(sample: dict[str, Any]) -> str:
    if isinstance(sample.get("response"), str):  # the run's own split task
        return _clip(sample["response"], 80)
    resps, choices = sample.get("filtered_resps"), _choices(sample)
    if choices and isinstance(resps, list) and len(resps) == len(choices):
        scores = [r[0] if isinstance(r, list) and r else r for r in resps]
        if all(isinstance(s, (int, float)) for s in scores):
            return choices[max(range(len(scores)), key=scores.__getitem__)].strip()
    if isinstance(resps, list) and resps and isinstance(resps[0], str):  # generate_until
        return _clip(resps[0], 80)
    return _clip(str(resps), 80)


def _mark(prediction: str, target: str) -> str:
    ok = prediction.strip() == target.strip()
    return f'<span class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"} {_e(prediction)}</span>'


# --- small helpers ------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _section(title: str, body: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{body}"


def _missing(stage: str) -> str:
    return f'<p class="muted">No output from the {stage} stage (not run, or it failed: see Stages).</p>'


def _kv(cells: list[tuple[str, str]]) -> str:
    rows = "".join(f'<tr><th>{_e(k)}</th><td class="text">{v}</td></tr>' for k, v in cells)
    return f'<table class="t">{rows}</table>'


def _cards(cells: list[tuple[str, str]]) -> str:
    return '<dl class="stats">' + "".join(f"<div><dt>{_e(k)}</dt><dd>{v}</dd></div>" for k, v in cells) + "</dl>"


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), text_cols: set[int] = frozenset()):
    def cls(i: int) -> str:
        return ' class="n"' if i in numeric else ' class="text"' if i in text_cols else ""

    header = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="t"><tr>{header}</tr>{body}</table>'


def _spec(f: dataclasses.Field) -> str:
    names = [f"KFP {f.metadata['kfp']}"] if "kfp" in f.metadata else []
    if "component" in f.metadata:
        names.append(f"component {f.metadata['component']}")
    return "; ".join(names)


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value) if value else "—" if value == {} else "[]"
    return str(value) if value != "" else '""'


def _pm(value: Any, stderr: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    err = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) and math.isfinite(stderr) else ""
    return f"{value:.4f}<span class='k'>{err}</span>"


def _f(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "—"


def _n(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}" if isinstance(value, (int, float)) else "—"


def _clip(text: str, limit: int = 300) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))
