"""Policy tests: cases in YAML that say which verdict a call must get, run on a real engine.

A test file (``*.test.yaml``) names the policy file under test and lists cases::

    policies: policies.yaml              # relative to this file, or the policies inline
    cases:
      - name: the second $30 purchase asks a human
        now: 2026-11-24T10:00:00Z        # optional: the engine's clock for the case
        given:
          totals:                        # optional: running totals, set first
            - {dimension: spend_usd, agent: agent-1, amount: 10}
          calls:                         # optional: run next, in order; each must be ALLOWed
            - {skill: finance.spend, agent: agent-1, params: {amount_usd: 30}, times: 1}
        semantic: holds                  # optional: holds | breached | {rule text: holds, ...}
        call: {skill: finance.spend, agent: agent-1, params: {amount_usd: 30}}
        expect: {verdict: ESCALATE, policy: spend_usd, reason: "would reach"}

``expect`` may also name ``shadow:``, the verdict the call would get with its shadow-mode
policies enforced (``decision.shadow_verdict``, or the verdict itself when no shadow policy
would change it), and ``shadow_policy:``, the policy that would decide that verdict.

Each case runs on a fresh engine (in-memory state, no audit log, a frozen clock, a scripted
model). Given calls really reserve and commit state; the case's call is a dry run
(:meth:`~limenex.core.engine.PolicyEngine.evaluate_sync`): the verdict a real call would get.

A failing case shows the per-policy trace of its call
(:meth:`~limenex.core.engine.PolicyEngine.explain_sync`, on the same engine and state).

A call the engine blocks fail-closed (a policy it cannot evaluate) gets that BLOCK, as a
real call would; a given call that is not ALLOWed, or raises, is a case error naming it.

Test files load as strictly as policy files: unknown keys, wrong types, a skill, dimension,
policy or rule the policy file does not have are :class:`~limenex.core.errors.PolicyFileError`
naming the file, the line and the key. So is a dimension or rule text that names several
policies of the skill (a soft and a hard limit): a case gives the position instead. From
pytest::

    result = run_test_file("policies/spend.test.yaml")
    assert result.passed, result.report()
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StrictStr, ValidationError
from pydantic_core import ErrorDetails
from yaml.nodes import MappingNode, Node

from limenex.approvals import InMemoryApprovalStore
from limenex.core.decision import Decision, Verdict
from limenex.core.engine import PolicyEngine
from limenex.core.errors import GovernanceSignal, LimenexConfigError, PolicyFileError
from limenex.core.evaluation import _Stateful, compile_skill
from limenex.core.explain import PolicyTrace
from limenex.core.policy import (
    Number,
    Policy,
    PolicySet,
    SemanticPolicy,
    _invalid,
    describe_input,
    did_you_mean,
)
from limenex.core.policy_store import (
    InMemoryPolicyStore,
    PolicyStore,
    _child,
    _explain,
    _follow,
    _line,
    _ParsedFile,
    _read,
    load_policy_text,
)
from limenex.core.state import CounterKey
from limenex.core.stores import InMemoryStateStore
from limenex.testing import FrozenClock

__all__ = [
    "CaseResult",
    "FileResult",
    "PolicyCase",
    "PolicyTestFile",
    "find_test_files",
    "load_test_file",
    "run_case",
    "run_test_file",
]

TEST_FILE_SUFFIX = ".test.yaml"
DEFAULT_NOW = datetime.fromtimestamp(1_750_000_000, UTC)
"""The clock of a case that gives no ``now``."""

Answer = Literal["holds", "breached"]
_ANSWERS = ("holds", "breached")
_VERDICTS = tuple(v.value for v in Verdict)
_MAX_TIMES = 100_000


# --- the format ---------------------------------------------------------------------------


def _moment(value: object) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise _invalid(
                f"expected a date and time such as 2026-11-24T10:00:00Z, got {value!r}"
            ) from None
    if not isinstance(value, datetime):
        hint = "add a time and an offset: 2026-11-24T00:00:00Z" if isinstance(value, date) else None
        raise _invalid(
            f"expected a date and time with an offset, got {describe_input(value)}",
            suggestion=hint,
        )
    if value.tzinfo is None or value.utcoffset() is None:
        raise _invalid(
            f"{value.isoformat()} has no UTC offset", suggestion="end it with Z or +HH:MM"
        )
    return value


def _verdict(value: object) -> Verdict:
    if isinstance(value, str) and value in _VERDICTS:
        return Verdict(value)
    hint = did_you_mean(value.upper(), _VERDICTS) if isinstance(value, str) else None
    raise _invalid(
        f"expected ALLOW, BLOCK or ESCALATE (upper-case), got {describe_input(value)}",
        suggestion=hint,
    )


def _answer(value: object) -> Answer:
    if value == "holds":
        return "holds"
    if value == "breached":
        return "breached"
    raise _invalid(
        f"expected holds or breached, got {describe_input(value)}",
        suggestion=did_you_mean(value, _ANSWERS),
    )


def _semantic(value: object) -> Answer | dict[str, Answer]:
    if isinstance(value, dict):
        return {str(rule): _answer(answer) for rule, answer in value.items()}
    if isinstance(value, str):
        return _answer(value)
    raise _invalid(
        "expected holds, breached or a mapping from rule text to holds/breached, "
        f"got {describe_input(value)}"
    )


def _policies(value: object) -> str | dict[str, Any]:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, dict):
        return value
    raise _invalid(
        "expected the path of a policy file (relative to this file) or the policies as a "
        f"mapping, got {describe_input(value)}"
    )


def _policy_ref(value: object) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.strip():
        return value
    raise _invalid(
        "expected a dimension, the exact text of a semantic rule or a position (1, 2, ...), "
        f"got {describe_input(value)}"
    )


def _times(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"expected a whole number, got {describe_input(value)}")
    if not 1 <= value <= _MAX_TIMES:
        raise _invalid(f"expected a whole number from 1 to {_MAX_TIMES:,}, got {value}")
    return value


def _params(value: object) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    raise _invalid(f"expected a mapping of call arguments, got {describe_input(value)}")


def _scope_values(value: object) -> dict[str, str | int]:
    params = _params(value)
    for name, item in params.items():
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise _invalid(
                f"the scope value of {name!r} must be text or an integer, "
                f"got {describe_input(item)}"
            )
    return params


Moment = Annotated[datetime, PlainValidator(_moment)]
Params = Annotated[dict[str, Any], PlainValidator(_params)]
Name = Annotated[StrictStr, Field(min_length=1)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GivenCall(_Model):
    """A call run before the case's call, through the real engine (it must be ALLOWed)."""

    skill: Name
    agent: Name
    params: Params = Field(default_factory=dict)
    times: Annotated[int, PlainValidator(_times)] = 1
    at: Moment | None = None


class GivenTotal(_Model):
    """A running total set directly (``state_store.adjust``), before the given calls."""

    dimension: Name
    agent: Name | None = None
    params: Annotated[dict[str, str | int], PlainValidator(_scope_values)] = Field(
        default_factory=dict
    )
    amount: Number
    at: Moment | None = None


class Given(_Model):
    totals: tuple[GivenTotal, ...] = ()
    calls: tuple[GivenCall, ...] = ()


class Call(_Model):
    skill: Name
    agent: Name
    params: Params = Field(default_factory=dict)


PolicyRef = Annotated[int | str, PlainValidator(_policy_ref)]


class Expectation(_Model):
    """What the case's call must get.

    ``shadow`` is the verdict with shadow-mode policies enforced: it holds when
    ``decision.shadow_verdict or decision.verdict`` is it. ``shadow_policy`` names the
    policy that decides that would-be verdict.
    """

    verdict: Annotated[Verdict, PlainValidator(_verdict)]
    policy: PolicyRef | None = None
    reason: Name | None = None
    shadow: Annotated[Verdict, PlainValidator(_verdict)] | None = None
    shadow_policy: PolicyRef | None = None


class PolicyCase(_Model):
    """One case of a test file. ``line`` is where it starts (not a YAML key)."""

    name: Name
    now: Moment | None = None
    given: Given = Field(default_factory=Given)
    semantic: Annotated[Answer | dict[str, Answer], PlainValidator(_semantic)] | None = None
    call: Call
    expect: Expectation
    line: int = Field(default=0, exclude=True)


class _FileModel(_Model):
    policies: Annotated[str | dict[str, Any], PlainValidator(_policies)]
    cases: Annotated[tuple[PolicyCase, ...], Field(min_length=1)]


# Which model a mapping under each key is (for "did you mean" on unknown keys).
_MODELS: dict[str, type[BaseModel]] = {
    "cases": PolicyCase,
    "given": Given,
    "calls": GivenCall,
    "totals": GivenTotal,
    "call": Call,
    "expect": Expectation,
}


@dataclass(frozen=True)
class PolicyTestFile:
    """A loaded test file: its cases and the policies they test."""

    path: str
    policy_store: PolicyStore
    cases: tuple[PolicyCase, ...]

    @property
    def policy_set(self) -> PolicySet:
        return self.policy_store.policy_set


# --- loading ------------------------------------------------------------------------------


def load_test_file(path: str | os.PathLike[str]) -> PolicyTestFile:
    """Load a test file and its policies; raise ``PolicyFileError`` naming file, line, key."""
    shown = str(path)
    document = _Document(_read(Path(path), shown), shown)
    root = document.root
    cases_value = document.value.get("cases")
    for index, case_value in enumerate(cases_value if isinstance(cases_value, list) else ()):
        if isinstance(case_value, dict) and "line" in case_value:  # a field, but not a key
            raise document.fail("unknown key", ("cases", index, "line"))
    try:
        model = _FileModel.model_validate(document.value)
    except ValidationError as exc:
        raise document.pydantic_error(exc) from None
    cases_node = _child(root, "cases")
    nodes = [] if cases_node is None else list(cases_node[1].value)
    cases = tuple(
        case.model_copy(update={"line": _line(node)})
        for case, node in zip(model.cases, nodes, strict=True)
    )
    store = _policy_store(model.policies, document)
    loaded = PolicyTestFile(shown, store, cases)
    for index, case in enumerate(cases):
        _check_case(loaded, index, case, document)
    return loaded


class _Document(_ParsedFile):
    """A YAML file composed by the policy loader's strict machinery, as a plain value."""

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.text = text
        self._loader = self._open(text)
        try:
            root = self._compose()
            if root is None:
                raise self.error("the file is empty; write policies: and cases:")
            if not isinstance(root, MappingNode):
                raise self.error("a test file is a mapping with policies: and cases:", root)
            self.root: Node = root
            self.value: Any = self._value(root, "")
        finally:
            self._loader.dispose()

    def fail(
        self, problem: str, loc: tuple[int | str, ...], suggestion: str | None = None
    ) -> PolicyFileError:
        node, key = _follow(self.root, loc)
        return self.error(problem, node, key=key, suggestion=suggestion)

    def pydantic_error(self, exc: ValidationError) -> PolicyFileError:
        errors = exc.errors()
        # A list with a bad item is also "too short": the item's own error says more.
        errors = [
            e
            for e in errors
            if not any(
                len(o["loc"]) > len(e["loc"]) and o["loc"][: len(e["loc"])] == e["loc"]
                for o in errors
            )
        ] or errors
        error = min(errors, key=lambda e: (e["type"] != "extra_forbidden", self._where(e)))
        node, key = _follow(self.root, error["loc"])
        problem, suggestion = _explain(error, key, _keys_at(error["loc"]))
        return self.error(problem, node, key=key, suggestion=suggestion)

    def _where(self, error: ErrorDetails) -> int:
        return _line(_follow(self.root, error["loc"])[0])


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    parents = [part for part in loc[:-1] if isinstance(part, str)]
    model = _MODELS.get(parents[-1], _FileModel) if parents else _FileModel
    return [name for name, info in model.model_fields.items() if not info.exclude]


def _policy_store(policies: str | dict[str, Any], document: _Document) -> PolicyStore:
    if isinstance(policies, str):  # one snapshot for every case: no reload mid-file
        target = Path(document.path).parent / policies
        try:
            text = _read(target, str(target))
        except PolicyFileError as exc:
            problem = f"cannot read the policy file {exc.path}: {exc.problem}"
            raise document.fail(problem, ("policies",)) from None
        return InMemoryPolicyStore(load_policy_text(text, str(target)))
    # Inline: the mapping's own text, at its own lines, so errors point into the test file.
    pair = _child(document.root, "policies")
    if pair is None:  # pragma: no cover - validated above
        raise document.error("policies: is missing")
    node = pair[1]
    start, end = node.start_mark, node.end_mark
    text = "\n" * start.line + " " * start.column + document.text[start.index : end.index]
    return InMemoryPolicyStore(load_policy_text(text, document.path))


def _check_case(loaded: PolicyTestFile, index: int, case: PolicyCase, document: _Document) -> None:
    """What only the policies can tell: skills, dimensions, policies and rules exist."""
    skills = loaded.policy_set.skills
    at: tuple[int | str, ...] = ("cases", index)

    def known_skill(skill_id: str, loc: tuple[int | str, ...]) -> None:
        if skill_id not in skills:
            raise document.fail(
                f"skill {skill_id!r} is not in the policy file",
                (*loc, "skill"),
                did_you_mean(skill_id, skills) or f"its skills: {', '.join(skills) or 'none'}",
            )

    for n, given in enumerate(case.given.calls):
        known_skill(given.skill, (*at, "given", "calls", n))
    known_skill(case.call.skill, (*at, "call"))
    for n, total in enumerate(case.given.totals):
        try:
            _counter_keys(loaded.policy_set, total)
        except _Problem as exc:
            loc = (*at, "given", "totals", n, *exc.loc)
            raise document.fail(exc.problem, loc, exc.suggestion) from None
    if isinstance(case.semantic, dict):
        rules = [p.rule for p in _all_policies(loaded.policy_set) if isinstance(p, SemanticPolicy)]
        for rule in case.semantic:
            if rule not in rules:
                raise document.fail(
                    "no semantic rule of the policy file has exactly this text",
                    (*at, "semantic", rule),
                    did_you_mean(rule, rules),
                )
    policies = skills[case.call.skill].policies
    for key, ref in (("policy", case.expect.policy), ("shadow_policy", case.expect.shadow_policy)):
        if ref is None:
            continue
        if isinstance(ref, int):
            if ref > len(policies):
                raise document.fail(
                    f"{case.call.skill} has {len(policies)} "
                    f"{'policy' if len(policies) == 1 else 'policies'}, not {ref}",
                    (*at, "expect", key),
                )
            continue
        positions = [str(n) for n, policy in enumerate(policies, 1) if _names(policy, ref)]
        if not positions:
            names = [_label(policy) for policy in policies]
            raise document.fail(
                f"no policy of {case.call.skill} has the dimension or rule {ref!r}",
                (*at, "expect", key),
                did_you_mean(ref, names) or f"its policies: {', '.join(names) or 'none'}",
            )
        if len(positions) > 1:  # soft and hard limits may share a dimension: which one?
            raise document.fail(
                f"{_quoted(ref)} names policies {_listed(positions, 'and')} of "
                f"{case.call.skill}; write its position: {_listed(positions, 'or')}",
                (*at, "expect", key),
            )


def _listed(items: list[str], last: str) -> str:
    """``1, 2 and 3``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def _all_policies(policy_set: PolicySet) -> Iterable[Policy]:
    return (policy for skill in policy_set.skills.values() for policy in skill.policies)


class _Problem(Exception):
    """A test-file problem found against the policies, at a location inside one entry."""

    def __init__(
        self, problem: str, loc: tuple[int | str, ...] = (), suggestion: str | None = None
    ) -> None:
        super().__init__(problem)
        self.problem, self.loc, self.suggestion = problem, loc, suggestion


def _counter_keys(policy_set: PolicySet, total: GivenTotal) -> list[tuple[CounterKey, _Stateful]]:
    """Every running total ``total`` sets: one per (scope, window) its dimension is kept in.

    The keys are built as the engine builds them (:class:`_Stateful`), so a total set here is
    the total a call reads.
    """
    steps: dict[tuple[str, str], _Stateful] = {}
    dimensions: set[str] = set()
    for skill_id, skill in policy_set.skills.items():
        for step in compile_skill(skill_id, skill).steps:
            if isinstance(step, _Stateful):
                dimensions.add(step.dimension)
                if step.dimension == total.dimension:
                    steps.setdefault((step.scope_name, step.window_spec), step)
    if not steps:
        raise _Problem(
            "no stateful policy keeps a running total of this dimension",
            ("dimension",),
            did_you_mean(total.dimension, dimensions)
            or f"stateful dimensions: {', '.join(sorted(dimensions)) or 'none'}",
        )
    if total.amount < 0:
        raise _Problem("a running total cannot be negative", ("amount",))
    names = {name for step in steps.values() for name in step.scope if name != "global"}
    if total.agent is not None and "agent" not in names:
        kept = (
            "across all agents (scope: global)"
            if not names
            else f"per {', '.join(sorted(names))}, not per agent"
        )
        raise _Problem(f"{total.dimension} is kept {kept}: remove agent:", ("agent",))
    for name in total.params:
        if name not in names:
            scope = ", ".join(sorted(names)) if names else "global"
            raise _Problem(
                f"{name!r} is not in the scope of {total.dimension} ({scope})",
                ("params", name),
                did_you_mean(name, names),
            )
    keys = []
    for step in steps.values():
        for name in step.scope:
            if name == "agent" and total.agent is None:
                raise _Problem(f"{total.dimension} is kept per agent: give agent:", ())
            if name not in ("agent", "global") and name not in total.params:
                raise _Problem(
                    f"{total.dimension} is kept per {', '.join(step.scope)}: "
                    f"give params: {{{name}: ...}}",
                    (),
                )
        subject = step.subject(total.agent or "", total.params)
        keys.append((CounterKey(total.dimension, step.scope_name, subject, step.window_spec), step))
    return keys


# --- running ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """What one case expected and what the engine decided.

    ``error`` is set when the case could not be decided (a given call was refused, a
    semantic rule had no answer); ``mismatches`` names what differed: ``verdict``,
    ``policy``, ``reason``, ``shadow``, ``shadow_policy``. ``trace`` is the per-policy trace
    of a case whose decision differed (``None`` otherwise).
    """

    path: str
    line: int
    name: str
    expected: Expectation
    expected_policy: str | None = None  # the expected policy as "policy 3 (spend_usd)"
    decision: Decision | None = None
    mismatches: tuple[str, ...] = ()
    error: str | None = None
    expected_shadow_policy: str | None = None
    trace: tuple[PolicyTrace, ...] | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and not self.mismatches

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def explain(self) -> list[str]:
        """The readable difference, one line each (empty when the case passed)."""
        if self.error is not None:
            return [f"error     {self.error}"]
        if self.passed or self.decision is None:
            return []
        expect, decision = self.expected, self.decision
        expected = _expected_text(expect, self.expected_policy, self.expected_shadow_policy)
        got = _decision_text(decision, shadow=expect.shadow is not None)
        lines = [f"expected  {expected}", f"got       {got}"]
        lines.append(f"reason    {decision.reason}")
        lines.append(f"differs   {', '.join(self.mismatches)}")
        for number, entry in enumerate(self.trace or ()):
            lines.append(f"{'trace' if number == 0 else '':<10}{_trace_line(entry)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path,
            "line": self.line,
            "name": self.name,
            "passed": self.passed,
            "expected": {
                "verdict": self.expected.verdict.value,
                "policy": self.expected.policy,
                "reason": self.expected.reason,
                "shadow": None if self.expected.shadow is None else self.expected.shadow.value,
                "shadow_policy": self.expected.shadow_policy,
            },
            "got": None if self.decision is None else self.decision.to_dict(),
            "mismatches": list(self.mismatches),
            "error": self.error,
            "trace": None if self.trace is None else [entry.to_dict() for entry in self.trace],
        }


@dataclass(frozen=True)
class FileResult:
    """The results of one test file's cases, in order."""

    path: str
    cases: tuple[CaseResult, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(case.passed for case in self.cases)

    @property
    def failures(self) -> tuple[CaseResult, ...]:
        return tuple(case for case in self.cases if not case.passed)

    def report(self) -> str:
        """One line per case and the difference of each failure (for assertion messages)."""
        lines = []
        for case in self.cases:
            mark = "✓" if case.passed else "✗"
            lines.append(f"{mark} {case.where}  {case.name}")
            lines += [f"    {line}" for line in case.explain()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path, "cases": [case.to_dict() for case in self.cases]}


def run_test_file(test_file: PolicyTestFile | str | os.PathLike[str]) -> FileResult:
    """Run every case of a test file (loading it first when given a path)."""
    loaded = test_file if isinstance(test_file, PolicyTestFile) else load_test_file(test_file)
    return FileResult(loaded.path, tuple(run_case(loaded, case) for case in loaded.cases))


def run_case(test_file: PolicyTestFile, case: PolicyCase) -> CaseResult:
    """Run one case on a fresh engine and compare its decision with the expectation."""
    skill = test_file.policy_set.skills.get(case.call.skill)
    described = shadow_described = None
    if case.expect.policy is not None and skill is not None:
        described = _policy_text(skill.policies, case.expect.policy)
    if case.expect.shadow_policy is not None and skill is not None:
        shadow_described = _policy_text(skill.policies, case.expect.shadow_policy)
    result = CaseResult(
        test_file.path,
        case.line,
        case.name,
        case.expect,
        described,
        expected_shadow_policy=shadow_described,
    )
    now = case.now or DEFAULT_NOW
    clock = FrozenClock(now)
    evaluator = _Answers(case.semantic)
    state = InMemoryStateStore()
    engine = PolicyEngine(
        test_file.policy_store,
        state_store=state,
        llm_evaluator=evaluator,
        audit_logger=False,
        clock=clock,
        approval_store=InMemoryApprovalStore(),
    )
    try:
        for number, total in enumerate(case.given.totals, 1):
            try:
                keys = _counter_keys(test_file.policy_set, total)
            except _Problem as exc:  # checked when loading; policies changed since
                return _replace(result, error=f"given total {number}: {exc.problem}")
            for key, step in keys:
                state.adjust(key, total.amount, (total.at or now).timestamp(), step.window)
        for number, given in enumerate(case.given.calls, 1):
            clock.set(given.at or now)
            for time in range(1, given.times + 1):
                error = _run_given(engine, given, evaluator)
                if error is not None:
                    which = f"given call {number}" + (
                        f" (time {time} of {given.times})" if given.times > 1 else ""
                    )
                    return _replace(result, error=f"{which} {error}")
        clock.set(now)
        try:
            decision = engine.evaluate_sync(case.call.skill, case.call.agent, case.call.params)
        except GovernanceSignal as exc:  # fail-closed: what a real call gets, so expectable
            decision = exc.decision
        except LimenexConfigError as exc:
            return _replace(result, error=f"the call was refused before evaluation: {exc}")
        if evaluator.missing:
            return _replace(result, error=_missing(evaluator.missing))
        mismatches = _compare(case.expect, decision)
        trace = _trace(engine, case.call) if mismatches else None
    finally:
        engine.close()
    return _replace(result, decision=decision, mismatches=mismatches, trace=trace)


def _trace(engine: PolicyEngine, call: Call) -> tuple[PolicyTrace, ...] | None:
    """The per-policy trace of the case's call, on the same engine and state (best effort)."""
    try:
        return engine.explain_sync(call.skill, call.agent, call.params, judge=True).trace
    except Exception:  # a diagnosis only: the case's result stands without it
        return None


def _trace_line(entry: PolicyTrace) -> str:
    """``3. cumulative 'spend_usd' → breached [decides]  spend_usd for agent ...``."""
    label = entry.label if len(entry.label) <= 50 else entry.label[:49] + "…"
    marks = [
        mark
        for mark, shown in (
            ("decides", entry.decisive),
            ("shadow", entry.mode == "shadow"),
            ("not reached", not entry.reached),
        )
        if shown
    ]
    tail = f" [{', '.join(marks)}]" if marks else ""
    return f"{entry.number}. {entry.kind} {label!r} → {entry.result}{tail}  {entry.detail}"


def _run_given(engine: PolicyEngine, given: GivenCall, evaluator: _Answers) -> str | None:
    """Run one given call; why it is a case error, or ``None`` when it was ALLOWed."""
    try:
        engine.execute_sync(given.skill, given.agent, given.params, _nothing)
    except GovernanceSignal as exc:
        if evaluator.missing:
            return _missing(evaluator.missing)
        decision = exc.decision
        verdict = "refused" if decision is None else decision.verdict.value
        reason = "" if decision is None else f": {decision.reason}"
        return f"was {verdict}, not ALLOW{reason}"
    except LimenexConfigError as exc:
        return f"was refused before evaluation: {exc}"
    except Exception as exc:  # whatever it is, the case cannot be decided: say which call
        return f"raised {_failure(exc)}"
    if evaluator.missing:  # a later policy allowed, but the case is incomplete
        return _missing(evaluator.missing)
    return None


def _failure(exc: BaseException) -> str:
    """``ValueError: embedded null byte``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _nothing() -> None:
    """The action of a given call: the engine records it; nothing happens."""


def _missing(rules: list[str]) -> str:
    return f"semantic rule {rules[0]!r} was asked; give its answer under `semantic:`"


class _Answers:
    """The case's model: answers from ``semantic:``, and notes every rule it cannot answer."""

    def __init__(self, script: Answer | dict[str, Answer] | None) -> None:
        self.script = script
        self.missing: list[str] = []

    def __call__(self, intent: str, rule: str) -> dict[str, str] | str:
        answer = self.script.get(rule) if isinstance(self.script, dict) else self.script
        if answer is None:
            self.missing.append(rule)
            raise LookupError(f"the test case gives no answer for {rule!r}")
        if answer == "holds":
            return "ALLOW"
        return {"verdict": "BLOCK", "reason": "the test case says it is breached"}


def _compare(expect: Expectation, decision: Decision) -> tuple[str, ...]:
    differs = []
    if decision.verdict is not expect.verdict:
        differs.append("verdict")
    if expect.policy is not None and not _decided_by(decision, expect.policy):
        differs.append("policy")
    if expect.reason is not None and expect.reason not in decision.reason:
        differs.append("reason")
    would_be = _would_be(decision)
    if expect.shadow is not None and would_be.verdict is not expect.shadow:
        differs.append("shadow")
    if expect.shadow_policy is not None and not _decided_by(would_be, expect.shadow_policy):
        differs.append("shadow_policy")
    return tuple(differs)


def _would_be(decision: Decision) -> Decision:
    """The decision with shadow policies enforced: the first shadow breach, when it comes
    before the decision's own policy; else the decision itself."""
    return decision.shadow[0] if decision.shadow_verdict is not None else decision


def _decided_by(decision: Decision, ref: int | str) -> bool:
    if decision.policy is None or decision.policy_index is None:
        return False
    if isinstance(ref, int):
        return decision.policy_index + 1 == ref
    return _names(decision.policy, ref)


def _names(policy: Policy, ref: str) -> bool:
    return _label(policy) == ref


def _label(policy: Policy) -> str:
    """How a case names a policy: a semantic rule's text, else its dimension."""
    if isinstance(policy, SemanticPolicy):
        return policy.rule
    return str(getattr(policy, "dimension", None) or policy.type)


def _policy_text(policies: Iterable[Policy], ref: int | str) -> str:
    """``policy 3 (spend_usd)``: the policies of a skill that ``ref`` names."""
    listed = list(policies)
    if isinstance(ref, int):
        label = f" ({_quoted(_label(listed[ref - 1]))})" if ref <= len(listed) else ""
        return f"policy {ref}{label}"
    positions = [str(n) for n, policy in enumerate(listed, 1) if _names(policy, ref)]
    which = " or ".join(positions) if positions else "?"
    return f"policy {which} ({_quoted(ref)})"


def _expected_text(
    expect: Expectation, policy: str | None = None, shadow_policy: str | None = None
) -> str:
    text = expect.verdict.value + _by(expect.policy, policy)
    if expect.reason is not None:
        text += f", reason containing {json.dumps(expect.reason, ensure_ascii=False)}"
    if expect.shadow is not None or expect.shadow_policy is not None:
        shadow = "" if expect.shadow is None else f" {expect.shadow.value}"
        text += f", shadow{shadow}{_by(expect.shadow_policy, shadow_policy)}"
    return text


def _by(ref: int | str | None, described: str | None) -> str:
    if described is not None:
        return f" by {described}"
    if isinstance(ref, int):
        return f" by policy {ref}"
    if ref is not None:
        return f" by {_quoted(ref)}"
    return ""


def _decision_text(decision: Decision, *, shadow: bool = False) -> str:
    """``ESCALATE by policy 3 (spend_usd)``; with the would-be verdict when there is one."""
    text = decision.verdict.value + _decided_text(decision)
    would_be = _would_be(decision)
    if shadow or would_be is not decision:
        text += f", shadow {would_be.verdict.value}{_decided_text(would_be)}"
    return text


def _decided_text(decision: Decision) -> str:
    if decision.policy is not None and decision.policy_index is not None:
        return f" by policy {decision.policy_index + 1} ({_quoted(_label(decision.policy))})"
    return ""


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False) if not text.isidentifier() else text


def _replace(result: CaseResult, **changes: Any) -> CaseResult:
    values = {**result.__dict__, **changes}
    return CaseResult(**values)


# --- discovery ----------------------------------------------------------------------------


def find_test_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given; for a directory, every ``*.test.yaml`` below it, sorted."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob(f"*{TEST_FILE_SUFFIX}") if p.is_file())
        else:
            found.append(path)
    return found
