"""Side-by-side rows from two lm-eval results (base and tuned), and the labels the table shows."""

from __future__ import annotations

import json
import math
from typing import Any


def precision_label(quant: dict[str, Any] | None) -> str:
    """How the base was loaded, for tables: "4-bit nf4", "8-bit" or "full"."""
    if not quant:
        return "full"
    if quant.get("bits") == 4:
        return f"4-bit {quant.get('quant_type') or 'nf4'}"
    return f"{quant.get('bits')}-bit"


def compare(base: dict | None, tuned: dict, precision: str = "full") -> list[dict]:
    """One row per task, metric and lm-eval filter: tuned vs base value, stderr and difference."""
    rows = []
    for task, metrics in tuned["results"].items():
        base_metrics = (base or {}).get("results", {}).get(task, {})
        for key, value in metrics.items():
            # lm-eval keys metrics as "metric,filter"; bare keys (alias, sample_len) are bookkeeping.
            if not isinstance(value, (int, float)) or "," not in key or "_stderr" in key:
                continue
            metric, _, filt = key.partition(",")
            stderr_key = f"{metric}_stderr,{filt}"
            b = base_metrics.get(key)
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "precision": precision,
                    "base": b,
                    "base_stderr": _num(base_metrics.get(stderr_key)),
                    "tuned": value,
                    "tuned_stderr": _num(metrics.get(stderr_key)),
                    "delta": value - b if isinstance(b, (int, float)) else None,
                }
            )
    return rows


def _num(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def jsonable(rows: list[dict]) -> list[dict]:
    """lm-eval's sample rows hold numpy values and other objects: as JSON, by their str() where needed."""
    return [json.loads(json.dumps(r, default=str)) for r in rows]


def eval_scope(tasks: list[str], limit: int) -> dict[str, Any]:
    """What an eval covered, recorded in eval_results.json: its tasks and documents per task (-1: all)."""
    return {"tasks": list(tasks), "limit": limit}


def recorded_scope(results: dict[str, Any]) -> dict[str, Any] | None:
    """The scope of a recorded result; for one written before `scope` was recorded, from its table's task
    names and lm-eval's recorded limit."""
    if isinstance(results.get("scope"), dict):
        return results["scope"]
    tasks = sorted({row["task"] for row in results.get("comparison") or [] if "task" in row})
    limit = ((results.get("tuned") or {}).get("config") or {}).get("limit")
    return eval_scope(tasks, -1 if limit is None else int(limit)) if tasks else None


def narrowing(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """How `new` covers less than `old` (tasks it drops, a lower limit); empty when it covers as much."""
    reasons = []
    dropped = [t for t in old["tasks"] if t not in new["tasks"]]
    if dropped:
        reasons.append(f"without {', '.join(dropped)}")
    was, now = old["limit"], new["limit"]
    if now >= 0 and (was < 0 or now < was):
        reasons.append(f"limit {now} (was {'all documents' if was < 0 else was})")
    return reasons


def replaced_line(old: dict[str, Any], new_scope: dict[str, Any]) -> str | None:
    """One line when a result that covers more is replaced by one that covers less, naming what it held."""
    scope = recorded_scope(old)
    reasons = narrowing(scope, new_scope) if scope else []
    if not reasons:
        return None
    scores = [
        f"{row['task']} {row['metric']} {row['tuned']:.4f}"
        for row in old.get("comparison") or []
        if isinstance(row.get("tuned"), (int, float))
    ]
    held = f" ({'; '.join(scores[:4])}{'; ...' if len(scores) > 4 else ''})" if scores else ""
    return f"this narrower eval ({', '.join(reasons)}) replaces the earlier result{held}"


def format_table(rows: list[dict]) -> str:
    """The eval comparison as text: one line per task, metric and lm-eval filter (strict-match and
    flexible-extract score the same answers differently, so a row means nothing without its filter).
    A precision column appears when the rows hold more than one (4-bit as trained and full precision)."""

    def score(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    precisions = {r.get("precision") for r in rows}
    text_columns = ["task", "metric", "filter"] + (["precision"] if len(precisions) > 1 else [])
    widths = {c: max([len(c)] + [len(str(r.get(c) or "-")) for r in rows]) for c in text_columns}
    header = [f"{c:<{widths[c]}}" for c in text_columns] + [f"{c:>8}" for c in ("base", "tuned", "delta")]
    lines = ["  ".join(header)]
    for r in rows:
        delta = "-" if r["delta"] is None else f"{r['delta']:+.4f}"
        cells = [f"{str(r.get(c) or '-'):<{widths[c]}}" for c in text_columns]
        cells += [f"{score(r['base']):>8}", f"{score(r['tuned']):>8}", f"{delta:>8}"]
        lines.append("  ".join(cells))
    return "\n".join(lines)
