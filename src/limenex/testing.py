"""Test doubles for users' own tests: a clock you move by hand and a scripted evaluator."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from limenex.core.evaluation import Intent

__all__ = ["FrozenClock", "ScriptedEvaluator"]


class FrozenClock:
    """A clock that stands still until you move it: ``clock.advance(seconds)``."""

    def __init__(self, start: float | datetime = 1_750_000_000.0) -> None:
        self._now = start.timestamp() if isinstance(start, datetime) else float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, moment: float | datetime) -> None:
        with self._lock:
            self._now = moment.timestamp() if isinstance(moment, datetime) else float(moment)


class ScriptedEvaluator:
    """A semantic evaluator that answers from a script and records what it was asked.

    ``ScriptedEvaluator(["ALLOW", "ESCALATE"])`` answers in order (and refuses to answer
    past the end, which the engine treats as a breach); ``ScriptedEvaluator(fn)`` answers
    ``fn(intent, rule)``. ``calls`` lists ``(intent, rule)`` pairs.
    """

    def __init__(self, script: Iterable[Any] | Callable[[Intent, str], Any]) -> None:
        self._fn = script if callable(script) else None
        self._answers = None if callable(script) else list(script)
        self.calls: list[tuple[Intent, str]] = []
        self._lock = threading.Lock()

    def __call__(self, intent: Intent, rule: str) -> Any:
        with self._lock:
            self.calls.append((intent, rule))
            if self._fn is not None:
                return self._fn(intent, rule)
            if not self._answers:
                raise LookupError("ScriptedEvaluator has no scripted answer left")
            return self._answers.pop(0)
