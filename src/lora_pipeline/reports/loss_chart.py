"""The self-contained HTML training-loss chart (`loss_chart.html`, also embedded in the run page).

The loss report is opened from artifact stores and laptops that may be offline, so everything (chart,
styles, data table) is plain HTML + inline SVG generated here with the stdlib: no JS, no fonts, no URLs.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from lora_pipeline.files import write_text_atomic

Point = tuple[float, float]  # (step, value)
Series = tuple[str, str, str, list[Point]]  # (css class, legend label, colour, points)

TRAIN_COLOUR, TREND_COLOUR, EVAL_COLOUR, LR_COLOUR = "#2563eb", "#1e3a8a", "#ea580c", "#059669"
TREND_MIN_POINTS = 50  # fewer train points are read one by one; more get a smoothed trend line over them
WIDTH = 880
LEFT, RIGHT, TOP, BOTTOM = 76, 24, 40, 52  # plot margins: room for tick labels, legend and axis titles

CSS = """
body{margin:0;background:#f1f5f9;color:#0f172a;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
"Helvetica Neue",Arial,sans-serif}
main{max-width:920px;margin:24px auto;padding:24px 28px;background:#fff;border-radius:10px;
box-shadow:0 1px 3px rgba(15,23,42,.12)}
h1{font-size:20px;margin:0 0 16px}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:10px;margin:0 0 18px}
.stats div{background:#f8fafc;border:1px solid #e2e8f0;border-radius:8px;padding:8px 12px}
.stats dt{font-size:12px;color:#64748b}.stats dd{margin:0;font-size:18px;font-weight:600}
.stats small{display:block;font-size:12px;font-weight:400;color:#64748b}
figure{margin:0 0 8px}svg.chart{width:100%;height:auto;display:block}
svg text{font-size:12px;fill:#475569;font-variant-numeric:tabular-nums}
svg .axis-title{font-size:13px;fill:#334155;font-weight:600}svg .legend text{fill:#334155}
.empty{padding:48px 16px;text-align:center;color:#64748b;background:#f8fafc;border-radius:8px}
details{margin-top:12px}summary{cursor:pointer;color:#334155;font-weight:600}
table{border-collapse:collapse;margin-top:8px;font-size:12px;font-variant-numeric:tabular-nums}
th,td{padding:3px 12px;text-align:right;border-bottom:1px solid #e2e8f0}th{color:#64748b;font-weight:600}
"""


def _num(value: Any) -> float | None:
    """Finite float or None: a single NaN/inf loss (a diverged step) would otherwise wreck the axis range."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _series(history: list[dict], key: str) -> list[Point]:
    # The Trainer's final summary record carries `train_loss`, not `loss`, so keying on the exact name skips it.
    points = [(_num(rec.get("step")), _num(rec.get(key))) for rec in history]
    return [(s, v) for s, v in points if s is not None and v is not None]


def _ticks(lo: float, hi: float, target: int, integer: bool = False) -> list[float]:
    """Round tick values (1/2/2.5/5 x 10^k) covering [lo, hi]; the axis then spans first..last tick."""
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):  # single point or constant loss: invent a range around it
        pad = 1.0 if integer else (abs(lo) * 0.1 or 1.0)
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    if integer:  # fractional ticks make no sense on a step axis
        step = max(1.0, step if step == int(step) else 5 * mag)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [0.0 if i == 0 else i * step for i in range(first, last + 1)]  # i*step avoids drift; no "-0"


def _fmt(value: float, step: float) -> str:
    """Tick label with just enough digits to tell neighbouring ticks apart (2.25, 1e-4, 2.5e-5, 1000)."""
    if value == 0:
        return "0"
    if step < 1e-3 and abs(value) < 1e-2:  # learning rates: 2e-5 reads better than 0.00002
        exp = math.floor(math.log10(abs(value)) + 1e-9)
        mantissa = f"{value / 10**exp:.2f}".rstrip("0").rstrip(".")
        return f"{mantissa}e{exp}"
    decimals = next(d for d in range(10) if abs(round(step, d) - step) <= step * 1e-6)
    return f"{value:.{decimals}f}"


def _spans_decades(values: list[float]) -> bool:
    """Whether a loss axis should be logarithmic: all values positive and the largest at least 100x the
    smallest. A run from a random init (loss 18 -> 0.001) is otherwise a spike and a flat line at zero."""
    return bool(values) and min(values) > 0 and max(values) >= 100 * min(values)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi], with 2x and 5x between them when the data spans three decades or less,
    and only every second (third, ...) power when it spans more than ten."""
    first, last = math.floor(math.log10(lo) + 1e-9), math.ceil(math.log10(hi) - 1e-9)
    if last - first > 10:  # a label every few decades: at most about ten on the axis
        every = math.ceil((last - first) / 10)
        first, last = first - first % every, last + (-last) % every
        return [10.0**k for k in range(first, last + 1, every)]
    steps = (1, 2, 5) if last - first <= 3 else (1,)
    ticks = [m * 10.0**k for k in range(first, last) for m in steps] + [10.0**last]
    low = max(i for i, t in enumerate(ticks) if t <= lo * (1 + 1e-9))  # the axis spans lo..hi, no more
    high = min(i for i, t in enumerate(ticks) if t >= hi * (1 - 1e-9))
    return ticks[low : high + 1]


def _fmt_log(value: float) -> str:
    """A log-axis label: 0.001 .. 1000 as decimals, beyond that 1e-4, 2e-5, 1e4."""
    if 1e-3 <= value < 1e4:
        return f"{value:.4g}"
    exp = math.floor(math.log10(value) + 1e-9)
    return f"{round(value / 10**exp):g}e{exp}"


def _panel(
    series: list[Series], xticks: list[float], height: int, y_title: str, y_target: int, log: bool = False
) -> str:
    """One SVG chart: gridlines, tick labels, axis titles, legend above the plot, then each series.
    `log`: a logarithmic y axis (every value must be positive)."""
    values = [v for *_, pts in series for _, v in pts]
    scale = math.log10 if log else float
    yticks = _log_ticks(min(values), max(values)) if log else _ticks(min(values), max(values), y_target)
    x0, x1, y0, y1 = xticks[0], xticks[-1], scale(yticks[0]), scale(yticks[-1])
    pw, ph = WIDTH - LEFT - RIGHT, height - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:  # SVG y grows downwards, so a lower loss is drawn lower on the page
        return TOP + (y1 - scale(y)) / (y1 - y0) * ph

    out = [f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{y_title} by step">']
    ystep, xstep = yticks[1] - yticks[0], xticks[1] - xticks[0]
    for t in yticks:
        y = sy(t)
        label = _fmt_log(t) if log else _fmt(t, ystep)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e2e8f0"/>')
        out.append(f'<text class="ytick" x="{LEFT - 8}" y="{y:.1f}" text-anchor="end" dy="0.32em">{label}</text>')
    for t in xticks:
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#f1f5f9"/>')
        out.append(f'<text class="xtick" x="{x:.1f}" y="{TOP + ph + 18}" text-anchor="middle">{_fmt(t, xstep)}</text>')
    out.append(
        f'<path d="M{LEFT} {TOP}V{TOP + ph}H{LEFT + pw}" fill="none" stroke="#94a3b8"/>'
        f'<text class="axis-title" x="{LEFT + pw / 2}" y="{height - 10}" text-anchor="middle">step</text>'
        f'<text class="axis-title" transform="translate(18 {TOP + ph / 2}) rotate(-90)" '
        f'text-anchor="middle">{y_title}</text>'
    )
    out.append(_legend(series, LEFT + pw))
    has_trend = any(css == "trend" for css, *_ in series)
    for css, label, colour, pts in series:
        dense = css != "eval" and len(pts) > 80  # hundreds of points: thinner line, smaller dots stay legible
        faded = ' opacity="0.4"' if css == "train" and has_trend else ""  # the trend line is what you read
        coords = " ".join(f"{sx(s):.1f},{sy(v):.1f}" for s, v in pts)
        width = 2.5 if css == "trend" else 1.5 if dense else 2
        out.append(
            f'<polyline class="series {css}" points="{coords}" fill="none" stroke="{colour}" '
            f'stroke-width="{width}" stroke-linejoin="round"{_dash(css)}{faded}/>'
        )
        if css == "trend":  # derived values: the raw points carry the tooltips and data
            continue
        radius = 3.5 if css == "eval" else (2 if len(pts) <= 250 else 1) if dense else 3
        for s, v in pts:
            tip = f"<title>step {s:g}: {label} {v:.6g}</title>"
            attrs = f' data-step="{s:g}" data-value="{v!r}"{faded}'
            out.append(_marker(css, sx(s), sy(v), colour, radius, attrs, tip))
    return "".join(out) + "</svg>"


def _legend(series: list[Series], right: float) -> str:
    """The legend sits in the top margin, right-aligned at `right`, so it can never hide data points."""
    legend, x = [], right
    for css, label, colour, _ in reversed(series):
        x -= 7 * len(label) + 34
        marker = "" if css == "trend" else _marker(css, x + 11, TOP - 20, colour, 4.5)
        legend.append(
            f'<line x1="{x}" x2="{x + 22}" y1="{TOP - 20}" y2="{TOP - 20}" stroke="{colour}" '
            f'stroke-width="2"{_dash(css)}/>{marker}<text x="{x + 28}" y="{TOP - 20}" dy="0.32em">{label}</text>'
        )
    return f'<g class="legend">{"".join(legend)}</g>'


def _trend(points: list[Point], log: bool) -> list[Point]:
    """An exponential moving average over about a twentieth of the points, bias-corrected (as TensorBoard's
    smoothing) so that it starts at the first value; on a log axis it averages log-losses."""
    span = max(5, len(points) // 20)
    keep = 1 - 2 / (span + 1)
    to, back = (math.log, math.exp) if log else (float, float)
    avg, out = 0.0, []
    for i, (step, value) in enumerate(points, start=1):
        avg = keep * avg + (1 - keep) * to(value)
        out.append((step, back(avg / (1 - keep**i))))
    return out


def _dash(css: str) -> str:
    return ' stroke-dasharray="6 4"' if css == "eval" else ""


def _marker(css: str, x: float, y: float, colour: str, r: float, attrs: str = "", tip: str = "") -> str:
    """Circles for train/lr points, white-filled diamonds for eval so the two series differ beyond colour."""
    if css == "eval":
        d = f"M{x:.1f} {y - r * 1.3:.1f}l{r * 1.3:.1f} {r * 1.3:.1f}l{-r * 1.3:.1f} {r * 1.3:.1f}"
        d += f"l{-r * 1.3:.1f} {-r * 1.3:.1f}z"
        return f'<path class="pt {css}" d="{d}" fill="#fff" stroke="{colour}" stroke-width="2"{attrs}>{tip}</path>'
    return f'<circle class="pt {css}" cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{colour}"{attrs}>{tip}</circle>'


def _stats(train: list[Point], evals: list[Point], history: list[dict]) -> str:
    def show(v: float | None) -> str:
        return "—" if v is None else f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"

    best = min(train, key=lambda p: p[1]) if train else None
    steps = [s for rec in history if (s := _num(rec.get("step"))) is not None]
    cards = [
        ("First train loss", show(train[0][1] if train else None)),
        ("Last train loss", show(train[-1][1] if train else None)),
        ("Min train loss", show(best[1]) + f"<small>at step {best[0]:g}</small>" if best else "—"),
        ("Final eval loss", show(evals[-1][1] if evals else None)),
        ("Steps", f"{max(steps):g}" if steps else "—"),
    ]
    return '<dl class="stats">' + "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in cards) + "</dl>"


def _table(history: list[dict]) -> str:
    """Logged values merged per step (train and eval logs at the same step share a row)."""
    columns = ["epoch", "loss", "eval_loss", "learning_rate", "grad_norm"]
    rows: dict[Any, dict] = {}
    for rec in history:
        if "train_runtime" in rec or "train_loss" in rec:  # end-of-training summary, not a point
            continue
        if any(k in rec for k in columns[1:]):
            rows.setdefault(rec.get("step"), {}).update(rec)

    def cell(v: Any) -> str:  # NaN/inf stay visible here: the table is where you look for divergence
        return f"{v:.4g}" if isinstance(v, float) else "" if v is None else html.escape(str(v))

    head = "".join(f"<th>{c}</th>" for c in ["step", *columns])
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in ["step", *columns]) + "</tr>" for r in rows.values()
    )
    return f"<details><summary>Data ({len(rows)} logged steps)</summary><table><tr>{head}</tr>{body}</table></details>"


def render_loss_chart(history: list[dict], title: str = "Training loss") -> str:
    """Full standalone HTML page: summary cards, loss chart, learning-rate chart and a data table."""
    train, evals, lr = _series(history, "loss"), _series(history, "eval_loss"), _series(history, "learning_rate")
    parts = [f"<h1>{html.escape(title)}</h1>", _stats(train, evals, history)]
    if train or evals:
        # Both panels share one x-axis so a loss spike lines up with the learning rate that caused it.
        steps = [s for s, _ in train + evals + lr]
        xticks = _ticks(min(steps), max(steps), 8, integer=True)
        loss = [("train", "train loss", TRAIN_COLOUR, train)] if train else []
        loss += [("eval", "eval loss", EVAL_COLOUR, evals)] if evals else []
        log = _spans_decades([v for *_, pts in loss for _, v in pts])
        if len(train) > TREND_MIN_POINTS:
            loss.insert(1, ("trend", "train, smoothed", TREND_COLOUR, _trend(train, log)))
        parts.append(f"<figure>{_panel(loss, xticks, 380, 'loss (log scale)' if log else 'loss', 6, log)}</figure>")
        if lr:
            parts.append(f"<figure>{_panel([('lr', 'learning rate', LR_COLOUR, lr)], xticks, 200, 'lr', 3)}</figure>")
    else:
        parts.append('<p class="empty">No loss recorded: the training history has no finite loss values.</p>')
    parts.append(_table(history))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
        f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n"
    )


def write_loss_chart(history: list[dict], path: Path, title: str = "Training loss") -> Path:
    return write_text_atomic(render_loss_chart(history, title), path)
