"""Eval progress: lm-eval's request bars replaced by our lines (task, requests done/total, ETA), also without a
terminal; third-party INFO lines only at DEBUG."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_pipeline import progress as progress_module
from lora_pipeline.evaluation.request_progress import track_requests
from lora_pipeline.progress import WorkProgress


class Clock:
    """time.monotonic for the progress module: advanced by the test, so nothing depends on real time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    return fake


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("lora_pipeline")]


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 5000), seconds_per_request=st.sampled_from([0.001, 0.05, 1.0]))
def test_a_line_about_every_tenth_or_30_seconds_and_a_closing_line(total: int, seconds_per_request: float) -> None:
    clock = Clock()
    logged: list[str] = []
    logger = SimpleNamespace(info=lambda fmt, text: logged.append(text))
    original = progress_module.time.monotonic
    progress_module.time.monotonic = clock
    try:
        work = WorkProgress(logger, "eval: tuned demo_topic", total)  # type: ignore[arg-type]
        start = clock.now
        for _ in range(total):
            clock.now += seconds_per_request
            work.update()
        work.close()
    finally:
        progress_module.time.monotonic = original
    elapsed = clock.now - start  # as the progress saw it (60 x 0.05 s adds up to just under 3 s)
    if elapsed < work.min_seconds:
        assert logged == []  # a quick eval stays quiet
        return
    assert logged[-1].startswith(f"eval: tuned demo_topic {total:,}/{total:,} requests (100%) in ")
    # at most ~10 progress lines plus one per 30 s, and never a silence longer than 30 s (+ one request)
    assert len(logged) - 1 <= 10 + elapsed / 30
    for line in logged[:-1]:
        assert " ETA " in line and "requests (" in line
    assert len(logged) - 1 >= int(elapsed // (30 + seconds_per_request)) - 1


class FakeLM:
    """The part of an lm-eval model that the progress uses: request methods and the cache hook."""

    def __init__(self, clock: Clock) -> None:
        from lm_eval.api.model import CacheHook

        self.cache_hook = CacheHook(None)
        self.clock, self.disable_tqdm = clock, []

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        self.disable_tqdm.append(disable_tqdm)
        out = []
        for request in requests:
            self.clock.now += 1.0
            out.append((-1.0, True))
            self.cache_hook.add_partial("loglikelihood", request.args, out[-1])
        return out


def test_lm_eval_requests_print_progress_lines_with_task_and_eta(clock: Clock, caplog, monkeypatch) -> None:
    monkeypatch.setattr("os.isatty", lambda fd: False)  # no terminal: a pod's log
    lm = FakeLM(clock)
    track_requests(lm, "base")
    track_requests(lm, "tuned")  # one engine scored twice (vLLM): wrapped once, renamed
    requests = [SimpleNamespace(task_name="demo_topic", args=(f"q{i}", " a")) for i in range(100)]
    with caplog.at_level("INFO", logger="lora_pipeline"):
        assert lm.loglikelihood(requests) == [(-1.0, True)] * 100
    assert lm.disable_tqdm == [True]  # lm-eval's own bar is off, on a terminal too
    got = lines(caplog)
    assert got[0] == "eval: tuned demo_topic 10/100 requests (10%) ETA 1:30"
    assert len(got) == 10 and got[-1] == "eval: tuned demo_topic 100/100 requests (100%) in 1:40"


@pytest.mark.parametrize(("level", "third_party_info_shown"), [("INFO", False), ("WARNING", False), ("DEBUG", True)])
def test_third_party_info_lines_only_at_debug(level: str, third_party_info_shown: bool, monkeypatch) -> None:
    from lora_pipeline.logs import apply_verbosity

    for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY"):
        monkeypatch.delenv(name, raising=False)
    names = ["", "lora_pipeline", "lm_eval", "transformers", "datasets"]
    before = {name: logging.getLogger(name).level for name in names}
    try:
        apply_verbosity(level)
        for name in ("lm_eval.evaluator", "transformers.modeling_utils", "datasets.builder"):
            assert logging.getLogger(name).isEnabledFor(logging.INFO) is third_party_info_shown, name
            assert logging.getLogger(name).isEnabledFor(logging.WARNING)  # their warnings always show
        assert logging.getLogger("lora_pipeline.stages").isEnabledFor(logging.INFO) is (level != "WARNING")
    finally:
        for name, value in before.items():
            logging.getLogger(name).setLevel(value)
