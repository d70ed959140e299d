"""Why a call gets its verdict: a per-policy trace (``engine.explain``, ``limenex explain``).

The verdict of an :class:`Explanation` is the one :meth:`PolicyEngine.evaluate` gives, from
the same plan and the same totals. The trace adds what the verdict does not show: every
deterministic policy is judged, also those after the one that decided, with the numbers it
compared (observed, proposed, limit). Nothing here changes state.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from limenex.core.decision import Decision, Verdict, decimal_text
from limenex.core.evaluation import (
    _ONE,
    _SYMBOLS,
    CompiledSkill,
    Plan,
    _PerCall,
    _Schedule,
    _Set,
    _Stateful,
    calls,
    describe_counter,
)
from limenex.core.policy import Policy, SchedulePolicy, SemanticPolicy
from limenex.core.state import EXACT, OPERATORS, Check, CounterKey

__all__ = ["Explanation", "PolicyTrace", "Result", "stateful_checks"]

Result = Literal["holds", "breached", "not judged", "not asked"]
"""A policy's result: ``not judged`` is a semantic rule left to the model (no model was
asked); ``not asked`` one the engine would not ask, because an earlier policy decided."""


@dataclass(frozen=True)
class PolicyTrace:
    """One policy of the skill, judged against this call.

    ``number`` is 1-based, as in reasons ("policy 2"). For a stateful policy ``observed``
    is the recorded total (or call count) before the call, ``proposed`` what the call adds
    and ``projected`` their sum; for a per-call cap ``proposed`` and ``projected`` are the
    argument. ``reached`` is false for a policy after the one that decided: the engine
    would not get to it (its result is shown all the same).
    """

    number: int
    policy: Policy
    mode: Literal["enforce", "shadow"]
    result: Result
    detail: str
    reached: bool = True
    decisive: bool = False
    observed: Decimal | None = None
    proposed: Decimal | None = None
    projected: Decimal | None = None
    limit: Decimal | None = None
    judgement: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        """``per_call``, ``cumulative``, ``counter``, ``set``, ``schedule`` or ``semantic``."""
        if isinstance(self.policy, SemanticPolicy):
            return "semantic"
        if isinstance(self.policy, SchedulePolicy):
            return "schedule"
        return self.policy.kind

    @property
    def label(self) -> str:
        """The dimension, or a semantic rule's text."""
        return (
            self.policy.rule if isinstance(self.policy, SemanticPolicy) else self.policy.dimension
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "number": self.number,
            "kind": self.kind,
            "label": self.label,
            "mode": self.mode,
            "breach_verdict": self.policy.breach_verdict.value,
            "result": self.result,
            "reached": self.reached,
            "decisive": self.decisive,
            "observed": decimal_text(self.observed),
            "proposed": decimal_text(self.proposed),
            "projected": decimal_text(self.projected),
            "limit": decimal_text(self.limit),
            "detail": self.detail,
        }
        if self.judgement is not None:
            out["judgement"] = dict(self.judgement)
        return out


@dataclass(frozen=True)
class Explanation:
    """The verdict of a call and the per-policy trace behind it.

    ``unjudged`` lists the numbers of semantic rules the verdict depends on that no model
    judged (``judge=False``): the verdict assumes they hold; each would turn it into its
    breach verdict.
    """

    decision: Decision
    trace: tuple[PolicyTrace, ...]
    params: Mapping[str, Any]
    at: float
    unjudged: tuple[int, ...] = ()

    @property
    def verdict(self) -> Verdict:
        return self.decision.verdict

    def to_dict(self) -> dict[str, Any]:
        shadow = self.decision.shadow_verdict
        return {
            "skill_id": self.decision.skill_id,
            "agent_id": self.decision.agent_id,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
            "at": _iso(self.at),
            "verdict": self.decision.verdict.value,
            "policy": self.decision.policy_index + 1
            if self.decision.policy_index is not None
            else None,
            "reason": self.decision.reason,
            "shadow_verdict": None if shadow is None else shadow.value,
            "unjudged": list(self.unjudged),
            "trace": [entry.to_dict() for entry in self.trace],
        }

    def render(self) -> str:
        """Readable text: the verdict, then one block per policy."""
        return "\n".join(self._lines())

    def _lines(self) -> Iterator[str]:
        decision = self.decision
        when = _iso(self.at)
        yield f"{decision.skill_id} by {decision.agent_id!r} at {when}: {decision.verdict.value}"
        yield f"  {decision.reason}"
        for number in self.unjudged:
            rule = self.trace[number - 1].policy
            yield (
                f"  Semantic rule {number} was not judged (no model here): the verdict assumes it "
                f"holds; if it is breached the call gets {rule.breach_verdict.value}."
            )
        shadow = decision.shadow_verdict
        if shadow is not None:
            first = decision.shadow[0]
            number = (first.policy_index or 0) + 1
            yield (
                f"  Shadow: with shadow policies enforced it would be {shadow.value} "
                f"(policy {number})."
            )
        if not self.trace:
            yield "  The skill has no policies: every call is allowed."
            return
        yield ""
        for entry in self.trace:
            marks = []
            if entry.decisive:
                marks.append("decides")
            if entry.mode == "shadow":
                marks.append("shadow")
            if not entry.reached:
                marks.append("not reached")
            tail = f"  [{', '.join(marks)}]" if marks else ""
            yield (
                f"  {entry.number}. {entry.kind} {entry.label!r} → {entry.result}"
                f" (breach: {entry.policy.breach_verdict.value}){tail}"
            )
            yield f"       {entry.detail}"


def stateful_checks(
    skill: CompiledSkill, agent_id: str, params: Mapping[str, Any], amounts: Mapping[str, Decimal]
) -> list[Check]:
    """A check for every stateful policy of the skill, with its own limit (for ``peek``)."""
    checks = []
    for step in skill.steps:
        if type(step) is _Stateful:
            amount = _ONE if step.param is None else amounts[step.param]
            key = CounterKey(
                step.dimension, step.scope_name, step.subject(agent_id, params), step.window_spec
            )
            checks.append(Check(step.index, key, step.window, amount, step.op, step.limit))
    return checks


def explanation(
    plan: Plan,
    decision: Decision,
    checks: list[Check],
    totals: tuple[Decimal, ...],
    amounts: Mapping[str, Decimal],
    now: float,
    skipped: Collection[int],
) -> Explanation:
    """Build the trace of ``plan`` given every stateful check's total.

    ``skipped`` holds the indices of the semantic rules the engine would ask that were not
    asked; those that are enforced make the verdict depend on them (``unjudged``).
    """
    decisive = decision.policy_index
    counters = {c.policy_index: (c, t) for c, t in zip(checks, totals, strict=True)}
    added: dict[CounterKey, Decimal] = {}
    for check in checks:
        added.setdefault(check.key, check.amount)  # one call adds to a total once
    judged = {entry["policy_index"]: entry for entry in plan.judgements or ()}
    trace = []
    for step in plan.skill.steps:
        index = step.index
        if type(step) is _Stateful:
            check, total = counters[index]
            found = _stateful(step, check, total, added[check.key])
        elif type(step) is _PerCall:
            value = amounts[step.param]  # type: ignore[index]
            holds = step.test(value, step.limit)
            detail = f"{step.param} = {value}, must be {_SYMBOLS[step.op]} {step.limit}"
            found = _Found(_result(holds), detail, None, value, value, step.limit)
        elif type(step) is _Set:
            value = plan.params[step.param]  # type: ignore[index]
            inside = step.matches(value)
            listed = ", ".join(step.policy.values or ())
            detail = (
                f"{step.param} = {value!r} is {'in' if inside else 'not in'} [{listed}] "
                f"(match: {step.match}), must be {'not in' if step.negate else 'in'}"
            )
            found = _Found(_result(inside != step.negate), detail)
        elif type(step) is _Schedule:
            moment = step.local(now)
            policy = step.policy
            detail = (
                f"the call is at {moment:%a %H:%M} {policy.timezone}; allowed "
                f"{', '.join(policy.days)} {policy.hours}"
            )
            found = _Found(_result(step.holds(moment)), detail)
        else:
            found = _semantic(judged.get(index), index in skipped)
        trace.append(
            PolicyTrace(
                number=index + 1,
                policy=step.policy,
                mode="shadow" if step.shadow else "enforce",
                result=found.result,
                detail=found.detail,
                reached=decisive is None or index <= decisive,
                decisive=index == decisive,
                observed=found.observed,
                proposed=found.proposed,
                projected=found.projected,
                limit=found.limit,
                judgement=found.judgement,
            )
        )
    unjudged = tuple(e.number for e in trace if e.result == "not judged" and e.mode == "enforce")
    return Explanation(decision, tuple(trace), plan.params, now, unjudged)


@dataclass(frozen=True)
class _Found:
    result: Result
    detail: str
    observed: Decimal | None = None
    proposed: Decimal | None = None
    projected: Decimal | None = None
    limit: Decimal | None = None
    judgement: Mapping[str, Any] | None = None


def _result(holds: bool) -> Result:
    return "holds" if holds else "breached"


def _stateful(step: _Stateful, check: Check, total: Decimal, amount: Decimal) -> _Found:
    projected = EXACT.add(total, amount)
    unit = calls(total) if step.param is None else ""
    detail = (
        f"{describe_counter(check)}: {total}{unit} recorded + {amount} proposed = "
        f"{projected}, must be {_SYMBOLS[step.op]} {step.limit}"
    )
    holds = OPERATORS[step.op](projected, step.limit)
    return _Found(_result(holds), detail, total, amount, projected, step.limit)


def _semantic(entry: Mapping[str, Any] | None, unjudged: bool) -> _Found:
    if entry is None:
        if unjudged:
            return _Found("not judged", "judged by the model at run time; no model was asked")
        return _Found("not asked", "the model is not asked: an earlier policy decided")
    if "error" in entry:
        detail = f"no usable answer, so it counts as breached: {entry['error']}"
        return _Found("breached", detail, judgement=entry)
    verdict = entry.get("verdict")
    why = entry.get("reason") or ""
    detail = f"the model answered {verdict}" + (f": {why}" if why else "")
    return _Found(_result(verdict == Verdict.ALLOW.value), detail, judgement=entry)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)
