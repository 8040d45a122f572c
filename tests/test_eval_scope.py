"""A re-eval that covers less (a limit, fewer tasks) never replaces a fuller result without a line saying so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_pipeline.evaluation.results import eval_scope, narrowing, recorded_scope, replaced_line
from lora_pipeline.stages.evaluate import _replaced

FULL = {
    "scope": eval_scope(["demo_topic", "split"], -1),
    "comparison": [{"task": "demo_topic", "metric": "acc", "tuned": 0.935, "base": 0.21}],
}


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        (eval_scope(["demo_topic", "split"], -1), None),  # the same eval again
        (eval_scope(["demo_topic", "split", "arc_easy"], -1), None),  # wider
        (
            eval_scope(["demo_topic", "split"], 10),
            "this narrower eval (limit 10 (was all documents)) replaces the earlier result (demo_topic acc 0.9350)",
        ),
        (eval_scope(["demo_topic"], -1), "this narrower eval (without split) replaces the earlier result"),
        (eval_scope(["arc_easy"], 5), "this narrower eval (without demo_topic, split, limit 5 (was all documents))"),
    ],
)
def test_replaced_line(new: dict, expected: str | None) -> None:
    line = replaced_line(FULL, new)
    assert line == expected if expected is None else line.startswith(expected)


tasks = st.lists(st.sampled_from(["a", "b", "c", "split"]), min_size=1, max_size=4, unique=True)
limits = st.sampled_from([-1, 1, 10, 200])


@settings(max_examples=60, deadline=None)
@given(old_tasks=tasks, old_limit=limits, new_tasks=tasks, new_limit=limits)
def test_narrowing_is_said_exactly_when_the_new_eval_covers_less(old_tasks, old_limit, new_tasks, new_limit) -> None:
    old, new = eval_scope(old_tasks, old_limit), eval_scope(new_tasks, new_limit)
    covers_less = not set(old_tasks) <= set(new_tasks) or (new_limit >= 0 and (old_limit < 0 or new_limit < old_limit))
    assert bool(narrowing(old, new)) is covers_less
    assert (replaced_line({"scope": old}, new) is not None) is covers_less


def test_scope_of_a_result_recorded_before_scopes_were() -> None:
    old = {"comparison": [{"task": "t", "metric": "acc", "tuned": 0.5}], "tuned": {"config": {"limit": 20}}}
    assert recorded_scope(old) == {"tasks": ["t"], "limit": 20}
    assert recorded_scope({"comparison": []}) is None  # nothing to compare with: no line


def test_the_line_names_the_registered_version_that_keeps_the_earlier_scores(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps(FULL))
    assert _replaced(tmp_path / "eval", FULL["scope"]) is None
    (tmp_path / "register").mkdir()
    record = {"status": "registered", "model_name": "demo-topic", "version": "1.0.0"}
    (tmp_path / "register" / "registration.json").write_text(json.dumps(record))
    replaced = _replaced(tmp_path / "eval", eval_scope(["demo_topic", "split"], 10))
    assert replaced["line"].endswith("; the registered demo-topic 1.0.0 keeps the earlier scores")
    assert replaced["scope"] == FULL["scope"] and replaced["comparison"] == FULL["comparison"]
