"""Semantic policies: a model the user supplies judges an action against a rule.

An evaluator is any callable ``(intent, rule) -> answer``, sync or async. ``intent`` is an
:class:`~limenex.core.evaluation.Intent`: the action as quoted JSON data (a ``str`` that also
carries ``skill_id``, ``agent_id`` and ``params``). The answer is parsed strictly by
:func:`parse_answer`; whatever cannot be parsed, raises, or takes longer than the timeout
resolves to the policy's breach verdict.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from limenex.core.decision import Verdict
from limenex.core.errors import EvaluatorError
from limenex.core.evaluation import Intent

__all__ = ["Evaluator", "Intent", "Judgement", "SemanticError", "parse_answer"]

Evaluator = Callable[[Intent, str], "Any | Awaitable[Any]"]
"""``(intent, rule) -> Verdict | str | {"verdict": ..., "reason": ...}`` (or awaitable)."""

_WORDS = {v.value: v for v in Verdict}


@dataclasses.dataclass(frozen=True, slots=True)
class Judgement:
    """A model's answer with what the audit log keeps of it.

    Adapters return one; the engine records ``model``, ``latency_ms``, ``raw`` (the model's
    answer as it came, before parsing), ``reason`` and ``cached`` in the call's audit
    records. A plain verdict, string or mapping is a :class:`Judgement` without the extras.
    """

    verdict: Verdict
    reason: str = ""
    model: str | None = None
    raw: str | None = None
    latency_ms: float | None = None
    cached: bool = False

    def details(self) -> dict[str, Any]:
        """The audit's view: JSON data, empty fields left out."""
        found: dict[str, Any] = {"verdict": self.verdict.value, "reason": self.reason}
        if self.model is not None:
            found["model"] = self.model
        if self.raw is not None:
            found["raw"] = self.raw
        if self.latency_ms is not None:
            found["latency_ms"] = round(self.latency_ms, 3)
        if self.cached:
            found["cached"] = True
        return found


class SemanticError(EvaluatorError):
    """An adapter's model failed, timed out or answered what cannot be parsed.

    Carries what the audit log keeps: ``model``, ``raw`` (the answer, when there was one)
    and ``latency_ms``. The engine resolves it to the policy's breach verdict.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        raw: str | None = None,
        latency_ms: float | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.raw = raw
        self.latency_ms = latency_ms


def parse_answer(answer: object) -> tuple[Verdict, str]:
    """Read an evaluator's answer as ``(verdict, reason)``; raise ``EvaluatorError`` if unclear.

    Accepted: a :class:`Verdict`; a string that is exactly one verdict word (surrounding
    white space and letter case ignored, nothing else around it); a mapping with a
    ``verdict`` of that form and an optional string ``reason``.
    """
    reason = ""
    if isinstance(answer, Judgement):
        if not isinstance(answer.verdict, Verdict) or not isinstance(answer.reason, str):
            raise EvaluatorError(f"evaluator judgement {answer!r:.200} is malformed")
        return answer.verdict, answer.reason
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
