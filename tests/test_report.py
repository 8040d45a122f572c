"""Tests for the self-contained HTML loss report, the eval comparison table and the atomic writers.

The charts are checked by parsing the inline SVG and comparing what is drawn with the input losses,
not by string snapshots, so layout tweaks don't break them but wrong plots do.
"""

from __future__ import annotations

import json
import math
import os
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lora_pipeline.evaluation.results import format_table
from lora_pipeline.files import write_json_atomic
from lora_pipeline.reports.loss_chart import render_loss_chart, write_loss_chart


def _history() -> list[dict]:
    """A small Trainer-like log: train logs every 5 steps, eval at 10 and 20, then the summary record."""
    losses = [2.4, 2.1, 1.7, 1.9]
    history: list[dict] = []
    for i, loss in enumerate(losses, start=1):
        step = 5 * i
        history.append({"loss": loss, "learning_rate": 1e-4 * (1 - step / 25), "grad_norm": 0.5, "step": step})
        if step % 10 == 0:
            history.append({"eval_loss": loss + 0.1, "eval_runtime": 1.0, "epoch": step / 10, "step": step})
    history.append({"train_runtime": 12.0, "train_loss": 2.0, "epoch": 2.0, "step": 20})
    return history


def _svgs(page: str) -> list[ET.Element]:
    # Inline SVG has no xmlns in HTML5; it is still well-formed XML, so ElementTree can read it.
    return [ET.fromstring(m) for m in re.findall(r"<svg\b.*?</svg>", page, flags=re.S)]


def _points(page: str, css: str) -> list[tuple[float, float, float]]:
    """(step, value, cy) for each drawn marker of a series, in document order."""
    out = []
    for svg in _svgs(page):
        for el in svg.iter():
            if el.get("class") == f"pt {css}" and el.get("data-step") is not None:
                cy = float(el.get("cy")) if el.tag == "circle" else _path_centre_y(el.get("d"))
                out.append((float(el.get("data-step")), float(el.get("data-value")), cy))
    return out


def _path_centre_y(d: str) -> float:
    # Eval diamonds start at their top vertex: "M x top l dx dy ..." with dy the half-height.
    nums = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", d)]
    return nums[1] + nums[3]


def _polyline(page: str, css: str) -> list[tuple[float, float]] | None:
    for svg in _svgs(page):
        for el in svg.iter("polyline"):
            if el.get("class") == f"series {css}":
                return [tuple(map(float, p.split(","))) for p in el.get("points").split()]
    return None


class _Checker(HTMLParser):
    """Collects tags so a test can check the page is balanced HTML (void elements excepted)."""

    VOID = {"meta", "br", "img", "link", "hr", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        pass  # self-closing SVG elements (<line/>, <path/>) open nothing

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> with open {self.stack[-3:]}")
        else:
            self.stack.pop()


def _assert_balanced(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []


def test_train_points_match_finite_losses_and_lower_loss_is_drawn_lower() -> None:
    history = _history()
    page = render_loss_chart(history)
    expected = [(r["step"], r["loss"]) for r in history if "loss" in r]

    pts = _points(page, "train")
    assert [(s, v) for s, v, _ in pts] == expected
    line = _polyline(page, "train")
    assert line is not None and len(line) == len(expected)
    # Line vertices and markers are the same positions.
    assert [y for _, y in line] == pytest.approx([cy for *_, cy in pts], abs=0.05)
    # x grows with step.
    assert [x for x, _ in line] == sorted(x for x, _ in line)
    # SVG y grows downwards: a lower loss has a larger y (sits lower on the page)...
    by_loss = sorted(pts, key=lambda p: p[1])
    assert [cy for *_, cy in by_loss] == sorted((cy for *_, cy in by_loss), reverse=True)
    # ...and the mapping is linear: equal loss differences give equal pixel differences.
    (_, l0, y0), (_, l1, y1) = by_loss[0], by_loss[-1]
    for _, loss, cy in pts:
        assert cy == pytest.approx(y0 + (loss - l0) * (y1 - y0) / (l1 - l0), abs=0.1)


def test_eval_series_only_when_eval_logs_exist() -> None:
    history = _history()
    page = render_loss_chart(history)
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    assert [(s, v) for s, v, _ in _points(page, "eval")] == evals
    assert "eval loss" in page  # legend entry

    train_only = [r for r in history if "eval_loss" not in r]
    page = render_loss_chart(train_only)
    assert _points(page, "eval") == [] and _polyline(page, "eval") is None
    assert "eval loss</text>" not in page


def test_eval_only_history_is_still_plotted() -> None:
    page = render_loss_chart([{"eval_loss": 2.0 - 0.1 * i, "step": 10 * i} for i in range(1, 4)])
    assert len(_points(page, "eval")) == 3
    assert _points(page, "train") == []


def test_summary_record_is_not_a_point() -> None:
    page = render_loss_chart(_history())
    assert 2.0 not in [v for _, v, _ in _points(page, "train")]  # train_loss of the summary record
    assert "Data (4 logged steps)" in page  # steps 5, 10, 15, 20; eval logs merge into their step's row


def test_learning_rate_panel() -> None:
    page = render_loss_chart(_history())
    assert len(_points(page, "lr")) == 4
    no_lr = [{"loss": 1.0 + i, "step": i} for i in range(3)]
    assert _points(render_loss_chart(no_lr), "lr") == []


def test_tick_labels_are_round_numbers_spanning_the_data() -> None:
    page = render_loss_chart(_history())
    loss_svg = _svgs(page)[0]
    yticks = [float(t.text) for t in loss_svg.iter("text") if t.get("class") == "ytick"]
    xticks = [float(t.text) for t in loss_svg.iter("text") if t.get("class") == "xtick"]
    assert 3 <= len(yticks) <= 12 and 3 <= len(xticks) <= 12
    assert yticks[0] <= 1.7 and yticks[-1] >= 2.4  # covers train (1.7..2.4) and eval (2.0..2.2)
    labels = [t.text for t in loss_svg.iter("text") if t.get("class") == "ytick"]
    assert all(len(label.partition(".")[2]) <= 2 for label in labels)  # 1.75, not 1.7483333
    step = yticks[1] - yticks[0]
    assert all(b - a == pytest.approx(step) for a, b in zip(yticks, yticks[1:], strict=False))
    assert all(x == int(x) for x in xticks)  # training steps are whole numbers


def test_a_loss_spanning_decades_gets_a_log_axis_with_power_of_ten_ticks() -> None:
    """A run from a random init (loss 18 -> 2e-4) on a linear axis is one spike, then a flat line at zero: its
    loss axis is logarithmic, labelled by powers of ten, and equal loss ratios are equal distances."""
    losses = [18.0, 4.0, 0.9, 0.3, 0.05, 0.0002]
    history = [{"loss": v, "step": 10 * i} for i, v in enumerate(losses, start=1)]
    page = render_loss_chart([*history, {"eval_loss": 0.5, "step": 40}])
    loss_svg = _svgs(page)[0]
    ticks = [(t.text, float(t.get("y"))) for t in loss_svg.iter("text") if t.get("class") == "ytick"]
    assert [label for label, _ in ticks] == ["1e-4", "0.001", "0.01", "0.1", "1", "10", "100"]
    gaps = [a[1] - b[1] for a, b in zip(ticks, ticks[1:], strict=False)]
    assert all(gap == pytest.approx(gaps[0], abs=0.2) and gap > 0 for gap in gaps)  # each decade as tall
    assert "loss (log scale)" in page
    pts = _points(page, "train") + _points(page, "eval")
    assert [v for _, v, _ in pts] == [*losses, 0.5]
    (_, l0, y0), (_, l1, y1) = pts[0], pts[-2]  # 18 and 0.0002
    for _, loss, cy in pts:
        expected = y0 + (math.log10(loss / l0)) * (y1 - y0) / math.log10(l1 / l0)
        assert cy == pytest.approx(expected, abs=0.1), loss


@pytest.mark.parametrize("losses", [[2.4, 1.1, 0.5, 0.03], [5.0, 0.0, 1e-3]], ids=["under-100x", "a-zero"])
def test_losses_within_two_decades_or_with_a_zero_keep_a_linear_axis(losses: list[float]) -> None:
    page = render_loss_chart([{"loss": v, "step": i} for i, v in enumerate(losses, start=1)])
    assert "log scale" not in page
    labels = [t.text for t in _svgs(page)[0].iter("text") if t.get("class") == "ytick"]
    ticks = [float(label) for label in labels]
    assert ticks[0] <= min(losses) and ticks[-1] >= max(losses)
    assert all(b - a == pytest.approx(ticks[1] - ticks[0]) for a, b in zip(ticks, ticks[1:], strict=False))


def test_many_train_points_get_a_smoothed_trend_line_under_them() -> None:
    """Hundreds of noisy train losses: a smoothed line (no markers of its own) is drawn over the faded raw
    points. It starts at the first loss, stays within the losses' range, and wiggles far less."""
    losses = [2.0 - i / 200 + (0.3 if i % 2 else -0.3) for i in range(120)]
    page = render_loss_chart([{"loss": v, "step": i + 1} for i, v in enumerate(losses)])
    raw, trend = _polyline(page, "train"), _polyline(page, "trend")
    assert raw is not None and trend is not None and len(trend) == len(raw) == 120
    assert [x for x, _ in trend] == [x for x, _ in raw]
    assert trend[0][1] == pytest.approx(raw[0][1], abs=0.05)
    assert min(y for _, y in raw) <= min(y for _, y in trend) and max(y for _, y in trend) <= max(y for _, y in raw)

    def wiggle(line: list[tuple[float, float]]) -> float:
        return sum(abs(b[1] - a[1]) for a, b in zip(line, line[1:], strict=False))

    assert wiggle(trend) < 0.3 * wiggle(raw)
    assert _points(page, "trend") == [] and len(_points(page, "train")) == 120  # tooltips stay on the raw points
    assert "train, smoothed" in page


def test_few_train_points_get_no_trend_line() -> None:
    page = render_loss_chart([{"loss": 2.0 - i / 100, "step": i} for i in range(1, 51)])
    assert _polyline(page, "trend") is None and "smoothed" not in page


def test_page_is_self_contained() -> None:
    page = render_loss_chart(_history())
    lowered = page.lower()
    for external in ("http://", "https://", "<script", "<link", "<img", "@import", "url("):
        assert external not in lowered
    _assert_balanced(page)


def test_title_is_escaped() -> None:
    page = render_loss_chart(_history(), title='<script>alert("x")</script> & co')
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    _assert_balanced(page)


def test_empty_history() -> None:
    page = render_loss_chart([])
    assert "No loss recorded" in page
    assert "<svg" not in page
    _assert_balanced(page)
    # A history with only the summary record has no loss to plot either.
    page = render_loss_chart([{"train_runtime": 1.0, "train_loss": 2.0, "step": 3}])
    assert "No loss recorded" in page


def test_nan_and_inf_losses_are_skipped() -> None:
    history = [{"loss": v, "step": i} for i, v in enumerate([2.0, math.nan, 1.5, math.inf, -math.inf, 1.0])]
    page = render_loss_chart(history)
    assert [(s, v) for s, v, _ in _points(page, "train")] == [(0, 2.0), (2, 1.5), (5, 1.0)]
    assert len(_polyline(page, "train")) == 3
    svg_text = "".join(re.findall(r"<svg\b.*?</svg>", page, flags=re.S))
    assert "nan" not in svg_text.lower() and "inf" not in svg_text.lower()

    only_nan = render_loss_chart([{"loss": math.nan, "step": 1}])
    assert "No loss recorded" in only_nan


@pytest.mark.parametrize(
    "history",
    [
        [{"loss": 1.234, "step": 7}],  # single point: zero x and y range
        [{"loss": 0.5, "step": s} for s in range(1, 6)],  # constant loss: zero y range
        [{"loss": 0.0, "step": s} for s in range(1, 4)],  # constant zero
    ],
)
def test_degenerate_ranges_give_finite_coordinates_inside_the_plot(history: list[dict]) -> None:
    page = render_loss_chart(history)
    pts = _points(page, "train")
    assert len(pts) == len(history)
    svg = _svgs(page)[0]
    height = float(svg.get("viewBox").split()[3])
    for circle in svg.iter("circle"):
        cx, cy = float(circle.get("cx")), float(circle.get("cy"))
        assert math.isfinite(cx) and math.isfinite(cy) and 0 < cy < height
    assert len({cy for *_, cy in pts}) == 1  # a constant loss is a flat line
    yticks = [float(t.text) for t in svg.iter("text") if t.get("class") == "ytick"]
    assert len(yticks) >= 2 and yticks[0] < history[0]["loss"] < yticks[-1]  # drawn mid-axis, not on the edge


def test_write_loss_chart_is_atomic(tmp_path: Path) -> None:
    target = tmp_path / "reports" / "loss.html"  # parent does not exist yet
    assert write_loss_chart(_history(), target, title="run 1") == target
    assert "run 1" in target.read_text(encoding="utf-8")
    write_loss_chart(_history(), target, title="run 2")  # overwrite in place
    assert "run 2" in target.read_text(encoding="utf-8")
    assert os.listdir(target.parent) == ["loss.html"]  # no temp files left behind


def test_failed_write_keeps_old_file_and_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic({"ok": 1}, target)

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic({"ok": 2}, target)
    assert json.loads(target.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_write_json_atomic_roundtrip(tmp_path: Path) -> None:
    target = tmp_path / "out" / "result.json"
    obj = {"accuracy": 0.75, "tasks": ["a", "b"], "path": Path("/x/y")}
    assert write_json_atomic(obj, target) == target
    assert json.loads(target.read_text()) == {"accuracy": 0.75, "tasks": ["a", "b"], "path": "/x/y"}
    assert os.listdir(target.parent) == ["result.json"]


def _row(task: str, metric: str, filt: str, precision: str, base: float | None, tuned: float) -> dict:
    return {
        "task": task,
        "metric": metric,
        "filter": filt,
        "precision": precision,
        "base": base,
        "tuned": tuned,
        "delta": None if base is None else tuned - base,
    }


def _cells(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()]


def test_table_names_the_filter_of_each_row() -> None:
    rows = [
        _row("gsm8k", "exact_match", "strict-match", "full", 0.25, 0.5),
        _row("gsm8k", "exact_match", "flexible-extract", "full", 0.5, 0.625),
    ]
    header, strict, flexible = _cells(format_table(rows))
    assert header == ["task", "metric", "filter", "base", "tuned", "delta"]  # one precision: no column for it
    assert strict == ["gsm8k", "exact_match", "strict-match", "0.2500", "0.5000", "+0.2500"]
    assert flexible == ["gsm8k", "exact_match", "flexible-extract", "0.5000", "0.6250", "+0.1250"]


def test_table_labels_precision_when_rows_hold_more_than_one() -> None:
    rows = [
        _row("arc_easy", "acc", "none", "4-bit nf4", 0.5, 0.75),
        _row("arc_easy", "acc", "none", "full", None, 0.5),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["task", "metric", "filter", "precision", "base", "tuned", "delta"]
    assert lines[1].split() == ["arc_easy", "acc", "none", "4-bit", "nf4", "0.5000", "0.7500", "+0.2500"]
    assert lines[2].split() == ["arc_easy", "acc", "none", "full", "-", "0.5000", "-"]
    # Columns line up: every score starts where its header does.
    assert len({len(line) for line in lines}) == 1
