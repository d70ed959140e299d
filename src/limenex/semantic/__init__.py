"""Semantic policies: a model the user supplies judges an action against a rule.

An evaluator is any callable ``(intent, rule) -> answer``, sync or async. ``intent`` is an
:class:`~limenex.core.evaluation.Intent`: the action as quoted JSON data (a ``str`` that also
carries ``skill_id``, ``agent_id`` and ``params``). The answer is parsed strictly by
:func:`parse_answer`; whatever cannot be parsed, raises, or takes longer than the timeout
resolves to the policy's breach verdict.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from limenex.core.decision import Verdict
from limenex.core.errors import EvaluatorError
from limenex.core.evaluation import Intent

__all__ = ["Evaluator", "Intent", "parse_answer"]

Evaluator = Callable[[Intent, str], "Any | Awaitable[Any]"]
"""``(intent, rule) -> Verdict | str | {"verdict": ..., "reason": ...}`` (or awaitable)."""

_WORDS = {v.value: v for v in Verdict}


def parse_answer(answer: object) -> tuple[Verdict, str]:
    """Read an evaluator's answer as ``(verdict, reason)``; raise ``EvaluatorError`` if unclear.

    Accepted: a :class:`Verdict`; a string that is exactly one verdict word (surrounding
    white space and letter case ignored, nothing else around it); a mapping with a
    ``verdict`` of that form and an optional string ``reason``.
    """
    reason = ""
    if isinstance(answer, Mapping):
        unknown = set(answer) - {"verdict", "reason"}
        if unknown:
            raise EvaluatorError(f"evaluator answer has unexpected keys {sorted(unknown)}")
        raw_reason = answer.get("reason", "")
        if not isinstance(raw_reason, str):
            raise EvaluatorError("evaluator answer's 'reason' is not a string")
        reason = raw_reason
        answer = answer.get("verdict")
    if isinstance(answer, Verdict):
        return answer, reason
    if isinstance(answer, str):
        verdict = _WORDS.get(answer.strip().upper())
        if verdict is not None:
            return verdict, reason
    raise EvaluatorError(f"evaluator answer {answer!r:.200} is not ALLOW, BLOCK or ESCALATE")
