"""The decision core: a pure function of (policies, call arguments, state totals).

Nothing here does I/O. :func:`compile_skill` turns a skill's policies into steps once;
:func:`plan_call` checks the call's arguments and walks the steps in order, deciding every
stateless policy and turning the stateful ones into :class:`~limenex.core.state.Check`
objects for the store's atomic reserve. The engine's sync and async drivers only move data
between this module, the state store, the evaluator and the executor.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import zoneinfo
from collections.abc import Collection, Mapping
from datetime import datetime
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Any

from limenex.core.decision import Decision, Verdict, allowed_decision
from limenex.core.errors import InvalidArgumentError, LimenexConfigError
from limenex.core.policy import (
    WEEKDAYS,
    DeterministicPolicy,
    Policy,
    SchedulePolicy,
    SemanticPolicy,
    SkillPolicies,
)
from limenex.core.state import EXACT, OPERATORS, Check, CounterKey, StateBreach
from limenex.core.window import Window

__all__ = [
    "CompiledSkill",
    "Intent",
    "Plan",
    "compile_skill",
    "describe_counter",
    "first_state_breach",
    "plan_call",
    "shadow_state",
    "to_decimal",
]

_new = tuple.__new__  # builds a NamedTuple without its Python-level __new__ (hot path)
_isfinite = math.isfinite
# What plan_call checks about an argument a policy reads.
_AMOUNT, _CUMULATIVE_AMOUNT, _TEXT, _SCOPE = "amount", "cumulative amount", "text", "scope"
_PATH = "path"
_SYMBOLS = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">=", "eq": "==", "neq": "!="}
_ONE = Decimal(1)


# --- steps -------------------------------------------------------------------------------


class _PerCall:
    __slots__ = ("index", "limit", "op", "param", "policy", "shadow", "test")

    def __init__(self, index: int, policy: DeterministicPolicy, shadow: bool) -> None:
        self.index = index
        self.policy = policy
        self.shadow = shadow
        self.param = policy.param
        self.op = policy.operator
        self.test = OPERATORS[policy.operator]
        self.limit = _required_value(policy)


class _Set:
    __slots__ = ("index", "match", "negate", "param", "patterns", "policy", "shadow")

    def __init__(self, index: int, policy: DeterministicPolicy, shadow: bool) -> None:
        self.index = index
        self.policy = policy
        self.shadow = shadow
        self.param = policy.param
        self.negate = policy.operator == "not_in"
        self.match = policy.match
        values = policy.values or ()
        self.patterns: frozenset[str] | tuple[str, ...]
        if policy.match == "exact":
            self.patterns = frozenset(values)
        elif policy.match == "path":
            # Policy values are trusted configuration: `~/.ssh` means the home folder's.
            self.patterns = tuple(normalise_path(os.path.expanduser(v)) for v in values)
        else:
            self.patterns = tuple(values)

    def matches(self, value: str) -> bool:
        if self.match == "exact":
            return value in self.patterns
        if self.match == "glob":
            return any(fnmatch.fnmatchcase(value, p) for p in self.patterns)
        path = normalise_path(value)
        return any(_path_within(path, p) for p in self.patterns)


class _Stateful:
    __slots__ = (
        "agent_scoped",
        "dimension",
        "index",
        "limit",
        "op",
        "param",
        "policy",
        "scope",
        "scope_name",
        "shadow",
        "window",
        "window_spec",
    )

    def __init__(self, index: int, policy: DeterministicPolicy, shadow: bool) -> None:
        self.index = index
        self.policy = policy
        self.shadow = shadow
        self.param = policy.param  # None: a call counter
        self.dimension = policy.dimension
        self.op = policy.operator
        self.limit = _required_value(policy)
        self.scope = policy.scope
        self.agent_scoped = policy.scope == ("agent",)
        self.scope_name = "+".join(policy.scope)
        self.window: Window | None = policy.window
        self.window_spec = "" if policy.window is None else policy.window.spec

    def subject(self, agent_id: str, params: Mapping[str, Any]) -> str:
        scope = self.scope
        if scope == ("agent",):
            return agent_id
        if scope == ("global",):
            return ""
        values = [agent_id if name == "agent" else params[name] for name in scope]
        return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


class _Semantic:
    __slots__ = ("index", "policy", "shadow", "verdict")

    def __init__(self, index: int, policy: SemanticPolicy, shadow: bool) -> None:
        self.index = index
        self.policy = policy
        self.shadow = shadow
        self.verdict = policy.breach_verdict


class _Schedule:
    __slots__ = ("days", "end", "index", "policy", "shadow", "start", "zone")

    def __init__(self, index: int, policy: SchedulePolicy, shadow: bool) -> None:
        self.index = index
        self.policy = policy
        self.shadow = shadow
        start, end = policy.hours.split("-")
        self.start, self.end = _minutes(start), _minutes(end)
        self.days = frozenset(WEEKDAYS.index(day) for day in policy.days)
        self.zone = zoneinfo.ZoneInfo(policy.timezone)

    def local(self, now: float) -> datetime:
        return datetime.fromtimestamp(now, self.zone)

    def holds(self, moment: datetime) -> bool:
        """Whether ``moment`` (local time) falls inside the schedule."""
        minute, day = moment.hour * 60 + moment.minute, moment.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Past midnight: the late part belongs to the day the window opened on.
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )

    def describe(self, moment: datetime) -> str:
        days = ", ".join(self.policy.days)
        return (
            f"the call at {moment:%a %H:%M} {self.policy.timezone} is outside "
            f"{self.policy.dimension} ({days} {self.policy.hours})"
        )


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


_Step = _PerCall | _Set | _Stateful | _Semantic | _Schedule


def _required_value(policy: DeterministicPolicy) -> Decimal:
    if policy.value is None:  # the loader guarantees it; refuse rather than guess
        raise LimenexConfigError(f"policy on {policy.dimension!r} has no value")
    return policy.value


class CompiledSkill:
    """A skill's policies, prepared once for fast evaluation."""

    __slots__ = (
        "amount_params",
        "arg_checks",
        "cumulative_params",
        "policies",
        "scope_params",
        "set_params",
        "skill_id",
        "source",
        "steps",
        "timed",
    )

    def __init__(self, skill_id: str, source: SkillPolicies) -> None:
        self.skill_id = skill_id
        self.source = source
        # Each policy with the mode it is applied in, so that what approval requests digest
        # (and decisions name) says shadow when a skill-wide mode made it so.
        self.policies: tuple[Policy, ...] = tuple(
            policy.model_copy(update={"mode": "shadow"})
            if policy.mode is None and source.mode == "shadow"
            else policy
            for policy in source.policies
        )
        steps: list[_Step] = []
        amount_params: dict[str, None] = {}
        cumulative: set[str] = set()
        set_params: dict[str, None] = {}
        path_params: set[str] = set()
        scope_params: dict[str, None] = {}
        for index, policy in enumerate(self.policies):
            shadow = source.policy_mode(index) == "shadow"
            if isinstance(policy, SemanticPolicy):
                steps.append(_Semantic(index, policy, shadow))
                continue
            if isinstance(policy, SchedulePolicy):
                steps.append(_Schedule(index, policy, shadow))
                continue
            kind = policy.kind
            if kind == "set":
                step: _Step = _Set(index, policy, shadow)
                set_params[_param(policy)] = None
                if policy.match == "path":
                    path_params.add(_param(policy))
            elif kind == "per_call":
                step = _PerCall(index, policy, shadow)
                amount_params[_param(policy)] = None
            else:
                step = _Stateful(index, policy, shadow)
                if policy.param is not None:
                    amount_params[policy.param] = None
                    cumulative.add(policy.param)
                for name in policy.scope:
                    if name not in ("agent", "global"):
                        scope_params[name] = None
            steps.append(step)
        self.steps: tuple[_Step, ...] = tuple(steps)
        self.timed = any(type(step) is _Schedule for step in steps)  # plan_call needs `now`
        self.amount_params = tuple(amount_params)
        self.cumulative_params = frozenset(cumulative)
        self.set_params = tuple(set_params)
        self.scope_params = tuple(scope_params)
        checks: dict[str, str] = {name: _SCOPE for name in scope_params}
        checks.update((name, _PATH if name in path_params else _TEXT) for name in set_params)
        checks.update(
            (name, _CUMULATIVE_AMOUNT if name in cumulative else _AMOUNT) for name in amount_params
        )
        self.arg_checks: tuple[tuple[str, str], ...] = tuple(checks.items())

    def referenced_params(self) -> set[str]:
        """Every call argument some policy reads (``agent`` scope excluded)."""
        return {*self.amount_params, *self.set_params, *self.scope_params}


def _param(policy: DeterministicPolicy) -> str:
    if policy.param is None:
        raise LimenexConfigError(f"policy on {policy.dimension!r} needs a param")
    return policy.param


def compile_skill(skill_id: str, source: SkillPolicies) -> CompiledSkill:
    return CompiledSkill(skill_id, source)


# --- argument checks ---------------------------------------------------------------------


MAX_DECIMAL_PLACES = 18
"""An amount may have at most this many digits after the decimal point."""
MAX_AMOUNT = Decimal(10) ** 30

WAIVED_LIMIT = Decimal(10) ** 36
"""The limit of a waived ESCALATE check: out of reach of any total the engine can count."""
"""Amounts are refused from this magnitude on: totals stay exact far beyond any budget."""
_QUANTUM = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)
_DROP_ZEROS = Context(prec=96, traps=[Inexact, InvalidOperation])  # rounding zeros away is fine


def to_decimal(name: str, value: object, *, allow_negative: bool = True) -> Decimal:
    """Turn a numeric argument into an exact Decimal, or refuse it naming the argument.

    Exactly ``int``, ``float`` and ``Decimal`` are accepted, finite, below
    :data:`MAX_AMOUNT` and with at most :data:`MAX_DECIMAL_PLACES` decimal places; a float
    is read as the shortest decimal that round-trips (``0.1`` is ``Decimal("0.1")``).
    ``bool``, strings and subclasses of the number types are refused: a subclass could
    report one value to the check and another to the executor.
    """
    kind = type(value)
    if kind is float:
        if not _isfinite(value):  # type: ignore[arg-type]
            raise InvalidArgumentError(
                f"argument {name!r} must be a finite number, got {value!r}", argument=name
            )
        number = Decimal(repr(value))
    elif kind is int:
        number = Decimal(value)  # type: ignore[arg-type]
    elif kind is Decimal:
        if not value.is_finite():  # type: ignore[attr-defined]
            raise InvalidArgumentError(
                f"argument {name!r} must be a finite number, got {value!r}", argument=name
            )
        number = value  # type: ignore[assignment]
    elif kind is not bool and isinstance(value, int | float | Decimal):
        base = next(t for t in (int, float, Decimal) if isinstance(value, t)).__name__
        raise InvalidArgumentError(
            f"argument {name!r} must be a plain {base}, got the subclass {kind.__name__}; "
            f"convert it with {base}(...)",
            argument=name,
        )
    else:
        raise InvalidArgumentError(
            f"argument {name!r} must be a number (int, float or Decimal), "
            f"got {kind.__name__} {value!r}",
            argument=name,
        )
    if number.copy_abs() >= MAX_AMOUNT:
        raise InvalidArgumentError(
            f"argument {name!r} is too large: {value!r} (amounts must stay below 1E+30)",
            argument=name,
        )
    if number.as_tuple().exponent < -MAX_DECIMAL_PLACES:  # type: ignore[operator]
        try:
            number = number.quantize(_QUANTUM, context=_DROP_ZEROS)
        except ArithmeticError:
            raise InvalidArgumentError(
                f"argument {name!r} has more than {MAX_DECIMAL_PLACES} decimal places: {value!r}",
                argument=name,
            ) from None
    if not allow_negative and number < 0:
        raise InvalidArgumentError(
            f"argument {name!r} must not be negative for a cumulative limit, got {value!r}; "
            "refunds go through the state API",
            argument=name,
        )
    return number


def _require_text(name: str, value: object) -> str:
    if type(value) is not str:
        raise InvalidArgumentError(
            f"argument {name!r} must be a string, got {type(value).__name__} {value!r}",
            argument=name,
        )
    return value


def _require_scope_value(name: str, value: object) -> None:
    if type(value) is not str and type(value) is not int:
        raise InvalidArgumentError(
            f"argument {name!r} scopes a limit and must be a string or an integer, "
            f"got {type(value).__name__} {value!r}",
            argument=name,
        )


def check_agent_id(agent_id: object) -> str:
    if type(agent_id) is not str or not agent_id:
        raise InvalidArgumentError(
            f"argument 'agent_id' must be a non-empty string, got {agent_id!r}",
            argument="agent_id",
        )
    return agent_id


# --- planning ------------------------------------------------------------------------------


class Plan:
    """Everything decided before state is touched, and what the store must check."""

    __slots__ = (
        "agent_id",
        "breach",
        "checks",
        "judgements",
        "params",
        "semantic",
        "shadow",
        "shadow_checks",
        "skill",
    )

    def __init__(
        self,
        skill: CompiledSkill,
        agent_id: str,
        params: Mapping[str, Any],
        checks: list[Check],
        semantic: list[_Semantic],
        breach: Decision | None,
        shadow: list[Decision] | None = None,
        shadow_checks: list[int] | None = None,
    ) -> None:
        self.skill = skill
        self.agent_id = agent_id
        self.params = params
        self.checks = checks
        self.semantic = semantic
        self.breach = breach  # the first stateless breach, if any
        self.judgements: list[dict[str, Any]] | None = None  # what the semantic rules answered
        # Shadow policies: what they would have decided, and which checks are theirs.
        self.shadow = shadow
        self.shadow_checks = shadow_checks

    def add_shadow(self, decision: Decision) -> None:
        if self.shadow is None:
            self.shadow = []
        self.shadow.append(decision)

    def shadow_breaches(self) -> tuple[Decision, ...]:
        """The shadow policies' breaches so far, in policy order."""
        if not self.shadow:
            return ()
        return tuple(sorted(self.shadow, key=lambda d: d.policy_index or 0))


def plan_call(
    skill: CompiledSkill,
    agent_id: str,
    params: Mapping[str, Any],
    *,
    waive: Collection[int] | None = None,
    now: float = 0.0,
) -> Plan:
    """Check the arguments, then decide the stateless policies in order.

    Stops at the first stateless breach: later policies are irrelevant, so no check or
    semantic rule after it is planned. ``now`` is the call's time (schedule policies).

    A shadow policy never stops anything: a stateless one's breach is kept in
    ``plan.shadow``; a stateful one is planned as a check that always holds (so its amount
    is counted) and judged from the totals the store answers (:func:`shadow_state`).

    ``waive`` plans the resume of an approved request: the indices of the ESCALATE policies a
    human approved this exact call against. Such a policy cannot decide the call: stateless,
    it is passed over; semantic, it is not asked; stateful, it still counts the amount, but
    with :data:`WAIVED_LIMIT` for a limit. Every other policy applies unchanged: a BLOCK stays
    a BLOCK, and another ESCALATE policy breached now asks a human again.
    """
    amounts: dict[str, Decimal] = {}
    for name, kind in skill.arg_checks:
        try:
            value = params[name]
        except KeyError:
            raise InvalidArgumentError(
                f"argument {name!r} is missing (a policy reads it)", argument=name
            ) from None
        if kind is _AMOUNT or kind is _CUMULATIVE_AMOUNT:
            if type(value) is float and (value >= 0 or kind is _AMOUNT):
                # The common case, inline: a float whose shortest repr has no exponent and
                # at most 19 characters is finite, below 1E+17 and has <= 17 decimals.
                text = repr(value)
                if len(text) <= 19 and "e" not in text and "n" not in text:
                    amounts[name] = Decimal(text)
                    continue
            amounts[name] = to_decimal(name, value, allow_negative=kind is _AMOUNT)
        elif kind is _TEXT:
            _require_text(name, value)
        elif kind is _PATH:
            if "\0" in _require_text(name, value):  # no file has such a name: refuse it
                raise InvalidArgumentError(
                    f"argument {name!r} is a path and must not contain a NUL byte", argument=name
                )
        else:
            _require_scope_value(name, value)

    checks: list[Check] = []
    semantic: list[_Semantic] = []
    breach: Decision | None = None
    shadow: list[Decision] | None = None
    shadow_checks: list[int] | None = None
    for step in skill.steps:
        found: Decision | None = None
        if type(step) is _Stateful:
            amount = _ONE if step.param is None else amounts[step.param]
            subject = agent_id if step.agent_scoped else step.subject(agent_id, params)
            key = _new(CounterKey, (step.dimension, step.scope_name, subject, step.window_spec))
            op, limit = step.op, step.limit
            if step.shadow:
                op, limit = "lte", WAIVED_LIMIT
                shadow_checks = [*(shadow_checks or ()), len(checks)]
            elif waive is not None and step.index in waive and _escalates(step):
                op, limit = "lte", WAIVED_LIMIT
            checks.append(_new(Check, (step.index, key, step.window, amount, op, limit)))
            continue
        elif waive is not None and step.index in waive and _escalates(step) and not step.shadow:
            continue
        elif type(step) is _PerCall:
            value = amounts[step.param]  # type: ignore[index]
            if not step.test(value, step.limit):
                found = _decision(
                    skill,
                    agent_id,
                    step.index,
                    value,
                    value,
                    step.limit,
                    f"{step.param} = {value} breaks '{step.policy.dimension} "
                    f"{_SYMBOLS[step.op]} {step.limit}'",
                )
        elif type(step) is _Set:
            value = params[step.param]  # type: ignore[index]
            inside = step.matches(value)
            if inside == step.negate:
                listed = ", ".join(step.policy.values or ())
                relation = "is in" if step.negate else "is not in"
                found = _decision(
                    skill,
                    agent_id,
                    step.index,
                    None,
                    None,
                    None,
                    f"{step.param} {value!r} {relation} {step.policy.dimension} [{listed}]",
                )
        elif type(step) is _Schedule:
            moment = step.local(now)
            if not step.holds(moment):
                found = _decision(
                    skill, agent_id, step.index, None, None, None, step.describe(moment)
                )
        else:
            semantic.append(step)  # type: ignore[arg-type]
            continue
        if found is not None:
            if not step.shadow:
                breach = found
                break
            shadow = [*(shadow or ()), found]
    return Plan(skill, agent_id, params, checks, semantic, breach, shadow, shadow_checks)


def _escalates(step: _Step) -> bool:
    return step.policy.breach_verdict is Verdict.ESCALATE


def state_decision(plan: Plan, breach: StateBreach) -> Decision:
    """The Decision for a stateful check the store refused."""
    check = plan.checks[breach.position]
    return _state_decision(plan, check, breach.observed, breach.projected, check.op, check.limit)


def shadow_state(plan: Plan, totals: tuple[Decimal, ...], before: int | None = None) -> None:
    """Judge the shadow policies' checks from the totals the store answered.

    ``totals`` holds each planned check's total before this call; only checks before
    position ``before`` are judged (the store answered no later ones). Breaches go to
    ``plan.shadow``.
    """
    positions = plan.shadow_checks
    if not positions:
        return
    added: dict[CounterKey, Decimal] = {}
    for position, check in enumerate(plan.checks):
        if before is not None and position >= before:
            break
        amount = added.setdefault(check.key, check.amount)
        if position not in positions:
            continue
        step = plan.skill.steps[check.policy_index]
        assert type(step) is _Stateful  # noqa: S101 - planned that way
        projected = EXACT.add(totals[position], amount)
        if not OPERATORS[step.op](projected, step.limit):
            found = _state_decision(plan, check, totals[position], projected, step.op, step.limit)
            plan.add_shadow(found)


def _state_decision(
    plan: Plan,
    check: Check,
    observed: Decimal,
    projected: Decimal,
    op: str,
    limit: Decimal,
) -> Decision:
    step = plan.skill.steps[check.policy_index]
    what = describe_counter(check)
    counter = isinstance(step, _Stateful) and step.param is None
    unit = calls(projected) if counter else ""
    reason = (
        f"{what} would reach {projected}{unit} ({observed} recorded + "
        f"{check.amount} proposed), breaking '{_SYMBOLS[op]} {limit}'"
    )
    return _decision(
        plan.skill, plan.agent_id, check.policy_index, observed, projected, limit, reason
    )


def semantic_decision(plan: Plan, step: _Semantic, why: str) -> Decision:
    return _decision(
        plan.skill,
        plan.agent_id,
        step.index,
        None,
        None,
        None,
        f"semantic rule {step.policy.rule!r} was breached: {why}",
    )


def _decision(
    skill: CompiledSkill,
    agent_id: str,
    index: int,
    observed: Decimal | None,
    projected: Decimal | None,
    limit: Decimal | None,
    reason: str,
) -> Decision:
    policy = skill.policies[index]
    verdict = policy.breach_verdict
    return Decision(
        verdict,
        skill.skill_id,
        agent_id,
        f"{skill.skill_id}: {reason} (policy {index + 1}, {verdict.value}).",
        policy,
        index,
        observed,
        projected,
        limit,
    )


def calls(count: Decimal) -> str:
    """`` call`` or `` calls``: the unit of a call counter's ``count``."""
    return " call" if count == 1 else " calls"


def describe_counter(check: Check) -> str:
    """``spend_usd for agent 'a' in window day``: the running total a check reads."""
    key = check.key
    what = key.dimension
    if key.scope == "agent":
        what += f" for agent {key.subject!r}"
    elif key.scope == "global":
        what += " across all agents"
    else:
        what += f" for {key.scope.replace('+', ', ')} {key.subject}"
    if check.window is not None:
        what += f" in window {check.window.spec}"
    return what


def allow_decision(plan: Plan) -> Decision:
    decision = allowed_decision(plan.skill.skill_id, plan.agent_id)
    return decision if plan.shadow is None else decision.with_shadow(plan.shadow_breaches())


def first_state_breach(checks: list[Check], totals: tuple[Decimal, ...]) -> StateBreach | None:
    """What ``reserve`` would answer for these totals (used by the dry run)."""
    added: dict[CounterKey, Decimal] = {}
    for position, check in enumerate(checks):
        amount = added.setdefault(check.key, check.amount)
        projected = EXACT.add(totals[position], amount)
        if not OPERATORS[check.op](projected, check.limit):
            return StateBreach(position, totals[position], projected)
    return None


# --- helpers ---------------------------------------------------------------------------------


def normalise_path(path: str) -> str:
    """Absolute, with ``..``, duplicate slashes and symlinks resolved."""
    return os.path.realpath(os.path.abspath(path))


def _path_within(path: str, root: str) -> bool:
    if path == root or root == os.sep:
        return True
    return path.startswith(root + os.sep)


class Intent(str):
    """What a semantic evaluator judges: the action as quoted JSON data.

    It is a ``str`` (``{"skill": ..., "agent_id": ..., "params": {...}}``) so a plain
    ``lambda intent, rule: ...`` works, and it carries ``skill_id``, ``agent_id`` and
    ``params`` for evaluators that want structure.
    """

    skill_id: str
    agent_id: str
    params: Mapping[str, Any]

    def __new__(cls, skill_id: str, agent_id: str, params: Mapping[str, Any]) -> Intent:
        text = json.dumps(
            {"skill": skill_id, "agent_id": agent_id, "params": dict(params)},
            ensure_ascii=False,
            sort_keys=True,
            default=_json_default,
        )
        self = super().__new__(cls, text)
        self.skill_id = skill_id
        self.agent_id = agent_id
        self.params = params
        return self


def _json_default(value: object) -> object:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return repr(value)
