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
