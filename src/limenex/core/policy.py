"""Policy models: what one entry of a policy file means, checked strictly.

A policy file maps skill ids to :class:`SkillPolicies`; each holds an ordered list of
policies. A :class:`DeterministicPolicy` is one of four kinds (see
:attr:`DeterministicPolicy.kind`):

* ``per_call``   – ``stateful: false``: the param's value itself ``<op> value``;
* ``cumulative`` – a param, stateful: ``recorded + amount <op> value``;
* ``counter``    – no param: ``count + 1 <op> value``;
* ``set``        – ``in`` / ``not_in``: the param's text against ``values``.

A :class:`SemanticPolicy` is a natural-language rule judged by the user's LLM.

The models are frozen and strict (unknown keys, wrong types and inconsistent combinations
are errors). Checks that need the skill id or the whole file live in :class:`PolicySet`.
Loading YAML, locating errors in a file and ``_extends`` live in
:mod:`limenex.core.policy_store`.
"""

from __future__ import annotations

import difflib
import re
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from types import MappingProxyType
from typing import Annotated, Any, Literal, NamedTuple, Self, TypeAlias

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictStr,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from limenex.core.decision import Verdict
from limenex.core.errors import LimenexConfigError
from limenex.core.window import CALENDAR_UNITS, Window

__all__ = [
    "BREACH_VERDICTS",
    "BUILTIN_NUMERIC_PARAMS",
    "BUILTIN_SKILL_PARAMS",
    "DIMENSION_PATTERN",
    "MATCH_MODES",
    "MODES",
    "NUMERIC_OPERATORS",
    "OPERATORS",
    "PARAM_PATTERN",
    "POLICY_TYPES",
    "SET_OPERATORS",
    "SKILL_ID_PATTERN",
    "DeterministicPolicy",
    "Policy",
    "PolicyCounts",
    "PolicyKind",
    "PolicySet",
    "PolicySetError",
    "SchedulePolicy",
    "SemanticPolicy",
    "SkillPolicies",
    "counted",
]

BUILTIN_SKILL_PARAMS: dict[str, tuple[str, ...]] = {
    "finance.spend": ("agent_id", "service", "amount_usd"),
    "finance.charge": ("agent_id", "provider", "amount", "currency"),
    "comms.send": ("agent_id", "channel", "recipient", "text"),
    "web.post": ("agent_id", "destination", "payload"),
    "filesystem.write": ("agent_id", "filepath", "content"),
    "filesystem.delete": ("agent_id", "filepath"),
    "filesystem.move": ("agent_id", "src", "dst"),
}
"""The params of each built-in skill, in signature order."""

BUILTIN_NUMERIC_PARAMS: dict[str, tuple[str, ...]] = {
    "finance.spend": ("amount_usd",),
    "finance.charge": ("amount",),
}
"""The params of built-in skills that carry a number; every other built-in param is text."""

NUMERIC_OPERATORS = ("lt", "lte", "gt", "gte", "eq", "neq")
SET_OPERATORS = ("in", "not_in")
OPERATORS = NUMERIC_OPERATORS + SET_OPERATORS
MATCH_MODES = ("exact", "glob", "path")
POLICY_TYPES = ("deterministic", "semantic", "schedule")
MODES = ("enforce", "shadow")
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
BREACH_VERDICTS = (Verdict.BLOCK.value, Verdict.ESCALATE.value)

SKILL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$"
DIMENSION_PATTERN = r"^[A-Za-z][A-Za-z0-9_.:-]*$"
PARAM_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
_WINDOW_PATTERN = rf"^([1-9][0-9]{{0,8}}[smhd]|{'|'.join(CALENDAR_UNITS)})$"
_AGENT = ("agent",)
_GLOBAL = ("global",)
_SCOPES = ("agent", "global")

PolicyKind: TypeAlias = Literal["per_call", "cumulative", "counter", "set"]


# --- helpers shared with the loader -------------------------------------------------------


def did_you_mean(word: object, choices: Iterable[str]) -> str | None:
    """``"did you mean 'param'?"`` when ``word`` is close to one of ``choices``."""
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def describe_input(value: object) -> str:
    """How a YAML value reads in an error message: ``the string '50'``, ``a list``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float | Decimal):
        return f"the number {value}"
    if isinstance(value, date):
        return f"the date {value.isoformat()}"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"{type(value).__name__} {value!r}"


def _invalid(problem: str, *, key: str | None = None, suggestion: str | None = None) -> Exception:
    """A validation error that keeps its parts, so the loader can say where and how to fix.

    ``key`` names the offending key when the error is raised for a whole policy.
    """
    message = f"{problem} ({suggestion})" if suggestion else problem
    context = {"problem": problem, "key": key, "suggestion": suggestion}
    return PydanticCustomError("limenex_policy", message, context)


def _matching(pattern: str, rule: str) -> Callable[[str], str]:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            raise _invalid(f"{value!r} is not a valid name: {rule}")
        return value

    return check


def _number(value: object) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        hint = "remove the quotes" if isinstance(value, str) else None
        raise _invalid(f"expected a number, got {describe_input(value)}", suggestion=hint)
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite():
        raise _invalid(f"expected a finite number, got {value}")
    return number


def _window(value: object) -> Window:
    if isinstance(value, Window):
        return value
    if not isinstance(value, str):
        raise _invalid(f"expected a window such as 24h or day, got {describe_input(value)}")
    try:
        return Window.parse(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _scope(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        if value in ("agent", "agent_id"):
            return _AGENT
        if value == "global":
            return _GLOBAL
        hint = did_you_mean(value, ("agent", "global")) or f"write [{value}] to count per {value}"
        raise _invalid(
            f"unknown scope {value!r}: use agent, global or a list of params", suggestion=hint
        )
    if not isinstance(value, list | tuple) or not value:
        raise _invalid(
            f"expected agent, global or a non-empty list of params, got {describe_input(value)}"
        )
    names = set()
    for item in value:
        if not isinstance(item, str) or re.fullmatch(PARAM_PATTERN, item) is None:
            raise _invalid(f"scope entries must be param names, got {describe_input(item)}")
        if item == "global":
            raise _invalid("'global' cannot be part of a list", suggestion="write scope: global")
        names.add("agent" if item == "agent_id" else item)
    return tuple(sorted(names))


def _breach_verdict(value: object) -> Verdict:
    if isinstance(value, str):
        if value in BREACH_VERDICTS:
            return Verdict(value)
        if value == Verdict.ALLOW:
            raise _invalid("ALLOW cannot be a breach verdict; use BLOCK or ESCALATE")
    hint = did_you_mean(value.upper(), BREACH_VERDICTS) if isinstance(value, str) else None
    raise _invalid(
        f"expected BLOCK or ESCALATE (upper-case), got {describe_input(value)}", suggestion=hint
    )


def _not_blank(value: str) -> str:
    if not value.strip():
        raise _invalid("must not be empty")
    return value


Dimension = Annotated[
    StrictStr,
    AfterValidator(
        _matching(DIMENSION_PATTERN, "start with a letter, then letters, digits, _ . : -")
    ),
    WithJsonSchema({"type": "string", "pattern": DIMENSION_PATTERN}),
]
ParamName = Annotated[
    StrictStr,
    AfterValidator(_matching(PARAM_PATTERN, "a param name is a Python identifier")),
    WithJsonSchema({"type": "string", "pattern": PARAM_PATTERN}),
]
Number = Annotated[Decimal, PlainValidator(_number), WithJsonSchema({"type": "number"})]
WindowSpec = Annotated[
    Window,
    PlainValidator(_window),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _WINDOW_PATTERN,
            "description": "rolling (10s, 30m, 24h, 7d) or calendar (hour, day, week, month; UTC)",
        }
    ),
]
Scope = Annotated[
    tuple[str, ...],
    PlainValidator(_scope),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": ["agent", "global"]},
                {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "string",
                        "pattern": PARAM_PATTERN,
                        "not": {"const": "global"},
                    },
                },
            ],
            "default": "agent",
            "description": "agent (default), global or a list of params: [agent, recipient]",
        }
    ),
]
BreachVerdict = Annotated[
    Verdict,
    PlainValidator(_breach_verdict),
    WithJsonSchema({"enum": list(BREACH_VERDICTS)}),
]
Text = Annotated[StrictStr, AfterValidator(_not_blank)]
Mode = Literal["enforce", "shadow"]
_MODE_DESCRIPTION = (
    "enforce (default): a breach decides the call; shadow: the breach is only audited and "
    "the call goes on"
)


def _hours(value: object) -> str:
    if not isinstance(value, str):
        raise _invalid(f"expected hours such as 09:00-17:30, got {describe_input(value)}")
    match = re.fullmatch(_HOURS_PATTERN, value)
    if match is None:
        raise _invalid(
            f"expected hours such as 09:00-17:30 (24-hour clock), got {value!r}",
            suggestion="write both ends as HH:MM",
        )
    start, end = match.group(1), match.group(2)
    if start == end:
        raise _invalid(f"hours {value!r} start and end at the same time")
    return f"{start}-{end}"


def _timezone(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"expected a time zone such as Europe/Berlin, got {describe_input(value)}")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise _invalid(
            f"unknown time zone {value!r}", suggestion="use an IANA name such as America/New_York"
        ) from None
    return value


def _days(value: object) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not value:
        raise _invalid(f"expected a list of days such as [mon, fri], got {describe_input(value)}")
    days: list[str] = []
    for day in value:
        if day not in WEEKDAYS:
            hint = did_you_mean(day.lower()[:3], WEEKDAYS) if isinstance(day, str) else None
            raise _invalid(
                f"unknown day {describe_input(day)}: use {', '.join(WEEKDAYS)}", suggestion=hint
            )
        if day in days:
            raise _invalid(f"day {day} is listed twice")
        days.append(day)
    return tuple(sorted(days, key=WEEKDAYS.index))


_HOURS_PATTERN = r"((?:[01][0-9]|2[0-3]):[0-5][0-9])-((?:[01][0-9]|2[0-3]):[0-5][0-9]|24:00)"
Hours = Annotated[
    str,
    PlainValidator(_hours),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^{_HOURS_PATTERN}$",
            "description": "HH:MM-HH:MM, 24-hour clock; an end before the start runs past midnight",
        }
    ),
]
TimeZone = Annotated[
    str,
    PlainValidator(_timezone),
    WithJsonSchema({"type": "string", "minLength": 1, "description": "an IANA time zone"}),
]
Days = Annotated[
    tuple[str, ...],
    PlainValidator(_days),
    WithJsonSchema(
        {
            "type": "array",
            "minItems": 1,
            "uniqueItems": True,
            "items": {"enum": list(WEEKDAYS)},
            "default": list(WEEKDAYS),
        }
    ),
]


# --- policies -----------------------------------------------------------------------------


class _PolicyModel(BaseModel):
    """Frozen, strict, and compared without ``line`` (where it was written is not what it is)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def _identity(self) -> tuple[Any, ...]:
        return tuple(v for k, v in self.__dict__.items() if k != "line")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash((type(self), self._identity()))

    def _first_written(self, *names: str) -> str | None:
        """The first of ``names`` that was given a value (defaults do not count)."""
        written = (n for n in names if n in self.model_fields_set and getattr(self, n) is not None)
        return next(written, None)


def _deterministic_schema(schema: dict[str, Any]) -> None:
    def forbid(*keys: str) -> dict[str, Any]:
        return {"not": {"anyOf": [{"required": [k]} for k in keys]}}

    def when(condition: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
        return {"if": condition, "then": then}

    numeric = {"properties": {"operator": {"enum": list(NUMERIC_OPERATORS)}}}
    set_op = {"properties": {"operator": {"enum": list(SET_OPERATORS)}}}
    per_call = {"properties": {"stateful": {"const": False}}, "required": ["stateful"]}
    schema["allOf"] = [
        when(numeric, {"required": ["value"], **forbid("values", "match")}),
        when(
            set_op,
            {
                "required": ["values", "param"],
                "properties": {"stateful": {"const": False}},
                **forbid("value", "window", "scope"),
            },
        ),
        when(per_call, {"required": ["param"], **forbid("window", "scope")}),
    ]


class DeterministicPolicy(_PolicyModel):
    """A numeric limit or an allow/deny list, decided without a model."""

    model_config = ConfigDict(json_schema_extra=_deterministic_schema)

    type: Literal["deterministic"]
    dimension: Dimension = Field(description="what is measured; stateful policies share it")
    param: ParamName | None = Field(default=None, description="the call argument compared")
    operator: Literal["lt", "lte", "gt", "gte", "eq", "neq", "in", "not_in"]
    value: Number | None = Field(default=None, description="the limit (numeric operators)")
    values: Annotated[tuple[StrictStr, ...], Field(min_length=1)] | None = Field(
        default=None, description="the set (in / not_in)"
    )
    match: Literal["exact", "glob", "path"] = "exact"
    stateful: StrictBool | None = None
    window: WindowSpec | None = None
    scope: Scope = _AGENT
    breach_verdict: BreachVerdict
    mode: Mode | None = Field(default=None, description=_MODE_DESCRIPTION)
    description: StrictStr | None = None
    line: SkipJsonSchema[int | None] = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        op = self.operator
        if op in NUMERIC_OPERATORS:
            if self.value is None:
                raise _invalid(f"operator {op} needs a value: to compare with", key="value")
            if key := self._first_written("values", "match"):
                raise _invalid(f"{key} belongs to the set operators in/not_in", key=key)
        else:
            for key in ("values", "param"):
                if getattr(self, key) is None:
                    raise _invalid(f"operator {op} needs {key}:", key=key)
            if key := self._first_written("value", "window", "scope"):
                raise _invalid(f"{key} has no meaning for operator {op} (a set check)", key=key)
            if self.stateful:
                raise _invalid(f"operator {op} cannot be stateful", key="stateful")
        if self.stateful is False:
            if self.param is None:
                raise _invalid(
                    "a per-call policy (stateful: false) needs a param to compare",
                    key="param",
                    suggestion="remove stateful: false to count calls instead",
                )
            if key := self._first_written("window", "scope"):
                raise _invalid(f"{key} needs a stateful policy, not stateful: false", key=key)
        return self

    @property
    def kind(self) -> PolicyKind:
        if self.operator in SET_OPERATORS:
            return "set"
        if self.stateful is False:
            return "per_call"
        return "counter" if self.param is None else "cumulative"

    @property
    def is_stateful(self) -> bool:
        return self.kind in ("cumulative", "counter")

    def to_yaml_dict(self) -> dict[str, Any]:
        """The policy as written, JSON-ready: numbers stay numbers, the window its spec."""
        out: dict[str, Any] = {"type": self.type, "dimension": self.dimension}
        for key in ("param", "operator", "value", "values", "match", "stateful", "window"):
            if key in self.model_fields_set or key == "operator":
                out[key] = _plain(getattr(self, key))
        if "scope" in self.model_fields_set:
            out["scope"] = self.scope[0] if self.scope in (_AGENT, _GLOBAL) else list(self.scope)
        out["breach_verdict"] = self.breach_verdict.value
        _common_keys(self, out)
        return {k: v for k, v in out.items() if v is not None}


def _semantic_schema(schema: dict[str, Any]) -> None:
    properties = schema["properties"]
    properties["verdict_ceiling"] = {
        **properties["breach_verdict"],
        "description": "alias of breach_verdict",
    }
    schema["required"] = [k for k in schema["required"] if k != "breach_verdict"]
    schema["oneOf"] = [{"required": ["breach_verdict"]}, {"required": ["verdict_ceiling"]}]


class SemanticPolicy(_PolicyModel):
    """A rule in plain language, judged by the LLM evaluator the user provides."""

    model_config = ConfigDict(json_schema_extra=_semantic_schema)

    type: Literal["semantic"]
    rule: Text
    breach_verdict: BreachVerdict = Field(
        validation_alias=AliasChoices("breach_verdict", "verdict_ceiling")
    )
    mode: Mode | None = Field(default=None, description=_MODE_DESCRIPTION)
    description: StrictStr | None = None
    line: SkipJsonSchema[int | None] = Field(default=None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _one_verdict(cls, data: Any) -> Any:
        if isinstance(data, dict) and "breach_verdict" in data and "verdict_ceiling" in data:
            raise _invalid(
                "give breach_verdict or its alias verdict_ceiling, not both", key="verdict_ceiling"
            )
        return data

    def to_yaml_dict(self) -> dict[str, Any]:
        out = {"type": self.type, "rule": self.rule, "breach_verdict": self.breach_verdict.value}
        _common_keys(self, out)
        return out


class SchedulePolicy(_PolicyModel):
    """Calls are in bounds only inside a weekly time window, such as business hours.

    The call's time is the engine's clock, read in ``timezone``. ``hours`` runs from its
    start (included) to its end (excluded); an end before the start runs past midnight and
    belongs to the day it started on (``22:00-06:00`` on ``fri`` is Friday night).
    """

    type: Literal["schedule"]
    dimension: Dimension = Field(description="names the rule in reasons, traces and tests")
    days: Days = WEEKDAYS
    hours: Hours
    timezone: TimeZone = "UTC"
    breach_verdict: BreachVerdict
    mode: Mode | None = Field(default=None, description=_MODE_DESCRIPTION)
    description: StrictStr | None = None
    line: SkipJsonSchema[int | None] = Field(default=None, exclude=True)

    def to_yaml_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "dimension": self.dimension}
        if "days" in self.model_fields_set:
            out["days"] = list(self.days)
        out["hours"] = self.hours
        if "timezone" in self.model_fields_set:
            out["timezone"] = self.timezone
        out["breach_verdict"] = self.breach_verdict.value
        _common_keys(self, out)
        return out


Policy: TypeAlias = DeterministicPolicy | SemanticPolicy | SchedulePolicy


def _common_keys(
    policy: DeterministicPolicy | SemanticPolicy | SchedulePolicy, out: dict[str, Any]
) -> None:
    # ``mode`` only when written: adding the key must not change the digest approvals keep.
    if policy.mode is not None:
        out["mode"] = policy.mode
    if policy.description is not None:
        out["description"] = policy.description


def _plain(value: object) -> object:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, Window):
        return value.spec
    if isinstance(value, tuple):
        return list(value)
    return value


class SkillPolicies(BaseModel):
    """The ordered policies of one skill. An empty list means: governed, no rules."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policies: tuple[Annotated[Policy, Field(discriminator="type")], ...]
    mode: Mode = Field(
        default="enforce",
        description="shadow: every policy of the skill (in this file) is audited, none enforced",
    )
    description: StrictStr | None = None

    @model_validator(mode="after")
    def _one_mode(self) -> Self:
        if self.mode == "shadow":
            for index, policy in enumerate(self.policies):
                if policy.mode == "enforce":
                    raise _invalid(
                        f"policy {index + 1} says mode: enforce, but the whole skill is in "
                        "shadow mode, where nothing is enforced",
                        key="mode",
                        suggestion="remove one of the two",
                    )
        return self

    def policy_mode(self, index: int) -> Mode:
        """The mode policy ``index`` is applied in: its own, else the skill's."""
        return self.policies[index].mode or self.mode


# --- the whole file -----------------------------------------------------------------------


class PolicyCounts(NamedTuple):
    skills: int
    policies: int
    deterministic: int
    semantic: int

    def summary(self) -> str:
        """``1 skill, 1 policy (1 deterministic, 0 semantic)``."""
        return (
            f"{counted(self.skills, 'skill', 'skills')}, "
            f"{counted(self.policies, 'policy', 'policies')} "
            f"({self.deterministic} deterministic, {self.semantic} semantic)"
        )


def counted(n: int, singular: str, plural: str) -> str:
    """``1 file``, ``2 files``: ``n`` and the noun that agrees with it."""
    return f"{n} {singular if n == 1 else plural}"


class PolicySetError(LimenexConfigError):
    """A policy set is inconsistent: ``skill_id``'s policy ``index`` (0-based) breaks a rule.

    ``index`` is ``None`` when the skill id itself is wrong. ``related`` names the
    ``(skill_id, index)`` of the policy this one conflicts with, if any.
    """

    def __init__(
        self,
        problem: str,
        *,
        skill_id: str,
        index: int | None = None,
        key: str | None = None,
        suggestion: str | None = None,
        related: tuple[str, int] | None = None,
    ) -> None:
        self.problem = problem
        self.skill_id = skill_id
        self.index = index
        self.key = key
        self.suggestion = suggestion
        self.related = related
        where = skill_id if index is None else f"{skill_id} policy {index + 1}"
        text = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        if related is not None:
            text += f" (policy {related[1] + 1} of {related[0]})"
        if suggestion:
            text += f" ({suggestion})"
        super().__init__(text)


@dataclass(frozen=True)
class PolicySet:
    """Every skill's policies after ``_extends`` was merged; checked as a whole.

    ``sources`` lists the files read, the extending file first.
    """

    skills: Mapping[str, SkillPolicies]
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skills", MappingProxyType(dict(self.skills)))
        _check_policy_set(self.skills)

    def get(self, skill_id: str) -> SkillPolicies | None:
        return self.skills.get(skill_id)

    @property
    def counts(self) -> PolicyCounts:
        policies = [p for skill in self.skills.values() for p in skill.policies]
        semantic = sum(isinstance(p, SemanticPolicy) for p in policies)
        return PolicyCounts(len(self.skills), len(policies), len(policies) - semantic, semantic)


def _check_policy_set(skills: Mapping[str, SkillPolicies]) -> None:
    first_kind: dict[str, tuple[str, int, DeterministicPolicy]] = {}
    first_param: dict[tuple[str, str], tuple[int, DeterministicPolicy]] = {}
    for skill_id, skill in skills.items():
        if not isinstance(skill, SkillPolicies):
            raise TypeError(f"policies of {skill_id!r} must be SkillPolicies, got {skill!r}")
        if re.fullmatch(SKILL_ID_PATTERN, skill_id) is None:
            raise PolicySetError(
                f"{skill_id!r} is not a valid skill id: letters, digits and _ . : / - "
                "starting with a letter or digit",
                skill_id=skill_id,
            )
        for index, policy in enumerate(skill.policies):
            if not isinstance(policy, DeterministicPolicy):
                continue
            _check_builtin_params(skill_id, index, policy)
            if not policy.is_stateful:
                continue
            other_skill, other_index, other = first_kind.setdefault(
                policy.dimension, (skill_id, index, policy)
            )
            if other.kind != policy.kind:
                raise PolicySetError(
                    f"dimension {policy.dimension!r} is {_measures(policy)} here but "
                    f"{_measures(other)} in another policy; give one of them another dimension",
                    skill_id=skill_id,
                    index=index,
                    key="dimension",
                    related=(other_skill, other_index),
                )
            other_index, other = first_param.setdefault(
                (skill_id, policy.dimension), (index, policy)
            )
            if other.param != policy.param:
                raise PolicySetError(
                    f"dimension {policy.dimension!r} adds up param {policy.param!r} here but "
                    f"{other.param!r} in another policy of this skill; one call must add "
                    "one amount to a dimension",
                    skill_id=skill_id,
                    index=index,
                    key="param",
                    related=(skill_id, other_index),
                )


def _measures(policy: DeterministicPolicy) -> str:
    return "a call counter" if policy.param is None else f"a running total of {policy.param!r}"


def _check_builtin_params(skill_id: str, index: int, policy: DeterministicPolicy) -> None:
    params = BUILTIN_SKILL_PARAMS.get(skill_id)
    if params is None:
        return  # a custom skill: the engine checks its signature

    def fail(problem: str, key: str, suggestion: str | None = None) -> PolicySetError:
        return PolicySetError(
            problem, skill_id=skill_id, index=index, key=key, suggestion=suggestion
        )

    named = [("param", policy.param)] + [("scope", s) for s in policy.scope if s not in _SCOPES]
    for key, name in named:
        if name is not None and name not in params:
            raise fail(
                f"{skill_id} has no param {name!r}; its params are: {', '.join(params)}",
                key,
                did_you_mean(name, params),
            )
    numeric = BUILTIN_NUMERIC_PARAMS.get(skill_id, ())
    if policy.param is None or (policy.param in numeric) == (policy.operator in NUMERIC_OPERATORS):
        return
    if policy.operator in SET_OPERATORS:
        raise fail(f"param {policy.param!r} is a number; in/not_in compare text", "param")
    raise fail(
        f"param {policy.param!r} of {skill_id} is text, not a number; "
        f"operator {policy.operator} needs a numeric param"
        + (f": {', '.join(numeric)}" if numeric else ""),
        "param",
        None if numeric else "leave out param to count calls",
    )
