"""Eval progress: lm-eval's request bars replaced by the project's progress lines (see `WorkProgress`).

lm-eval hands a model all requests of one type at once (`loglikelihood(requests)`), and its models report
each scored request to `lm.cache_hook.add_partial`; counting those calls gives requests done without
changing how the model batches them. Without a terminal lm-eval's own bars would print nothing readable.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lora_pipeline.progress import TerminalLine, WorkProgress

log = logging.getLogger(__name__)

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


class _CountingHook:
    """lm-eval's cache hook, passed through, counting each request scored."""

    def __init__(self, inner: Any, tracker: RequestProgress) -> None:
        self.inner, self.tracker = inner, tracker

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        self.inner.add_partial(attr, req, res)
        self.tracker.scored(attr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _NoCache:
    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        pass


class RequestProgress:
    """Installed once on an lm-eval model (`track_requests`); `label` names the model being scored now."""

    def __init__(self, lm: Any, label: str) -> None:
        self.label = label
        self.current: dict[str, WorkProgress] = {}
        lm.cache_hook = _CountingHook(getattr(lm, "cache_hook", None) or _NoCache(), self)
        for method in REQUEST_TYPES:
            if hasattr(lm, method):
                setattr(lm, method, self._wrap(method, getattr(lm, method)))

    def _wrap(self, method: str, original: Any) -> Any:
        def scored_with_progress(requests: list, *args: Any, **kwargs: Any) -> Any:
            tasks = sorted({str(getattr(r, "task_name", None) or "?") for r in requests})
            kind = "" if method == "loglikelihood" else f" {method}"
            live = TerminalLine() if os.isatty(2) else None
            what = f"eval: {self.label} {', '.join(tasks)}{kind}"
            self.current[method] = progress = WorkProgress(log, what, len(requests), live=live)
            kwargs["disable_tqdm"] = True  # lm-eval passes disable=False to its bars, whatever TQDM_DISABLE says
            try:
                return original(requests, *args, **kwargs)
            finally:
                self.current.pop(method, None)
                progress.close()

        return scored_with_progress

    def scored(self, method: str) -> None:
        progress = self.current.get(method)
        if progress is not None:
            progress.update()


def track_requests(lm: Any, label: str) -> None:
    """Progress lines for the requests `lm` scores, named `label` (base, tuned, ...). A model scored twice
    (vLLM's one engine for base and tuned) is wrapped once and renamed."""
    tracker = getattr(lm, "_lora_pipeline_progress", None)
    if tracker is None:
        lm._lora_pipeline_progress = RequestProgress(lm, label)
    else:
        tracker.label = label
