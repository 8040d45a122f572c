"""A deadline around a client library's blocking call, for clients whose requests cannot be given one
(the Model Registry client waits 5 minutes a request and retries; the Kubeflow Trainer SDK reads from the
API server with no timeout before it sends anything)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Overdue(Exception):
    """The call was still waiting when its time ran out."""


def within(seconds: float, call: Callable[[], T]) -> T:
    """call()'s result or exception, waited for at most `seconds`; else Overdue.

    The call runs in a daemon thread: a thread cannot be stopped, so an overdue one is abandoned and ends
    with the process, which it cannot keep alive."""
    if seconds <= 0:
        raise Overdue
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the caller's thread, which decides
            failure.append(exc)

    worker = threading.Thread(target=run, name="lora-pipeline-deadline", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise Overdue
    if failure:
        raise failure[0]
    return result[0]
