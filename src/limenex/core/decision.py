"""The verdict of one evaluation: what was decided, by which policy, and why."""

from __future__ import annotations

import enum
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from limenex.core.policy import Policy

__all__ = ["Decision", "Verdict", "allowed_decision", "allowed_reason", "decimal_text"]


class Verdict(enum.StrEnum):
    """Exactly one of these is returned for every governed call."""

    ALLOW = "ALLOW"
    BLOCK = "BLOCK"
    ESCALATE = "ESCALATE"


class Decision:
    """An immutable record of one evaluation.

    ``policy`` is the breached policy (``None`` when nothing was breached or when the call
    was refused before any policy applied); ``policy_index`` its position in the skill's
    policy list. For a numeric policy ``observed`` is the value before this call (the
    recorded total, the call count, or the argument itself for a per-call cap),
    ``projected`` the value the condition was tested against and ``limit`` the policy's
    ``value``. ``fail_closed`` marks a BLOCK that comes from an internal failure rather
    than from a policy.

    ``shadow`` holds what the skill's shadow-mode policies would have decided: the
    decision of each one breached, in policy order (empty when none was).
    :attr:`shadow_verdict` is the verdict the call would have got with them enforced.
    """

    __slots__ = (
        "agent_id",
        "fail_closed",
        "limit",
        "observed",
        "policy",
        "policy_index",
        "projected",
        "reason",
        "shadow",
        "skill_id",
        "verdict",
    )

    verdict: Verdict
    skill_id: str
    agent_id: str
    reason: str
    policy: Policy | None
    policy_index: int | None
    observed: Decimal | None
    projected: Decimal | None
    limit: Decimal | None
    fail_closed: bool
    shadow: tuple[Decision, ...]

    def __init__(
        self,
        verdict: Verdict,
        skill_id: str,
        agent_id: str,
        reason: str,
        policy: Policy | None = None,
        policy_index: int | None = None,
        observed: Decimal | None = None,
        projected: Decimal | None = None,
        limit: Decimal | None = None,
        fail_closed: bool = False,
        shadow: tuple[Decision, ...] = (),
    ) -> None:
        # Slot descriptors write past the frozen __setattr__ below; this keeps creating a
        # Decision cheap on the hot path (a frozen dataclass costs ~1 µs here).
        _set_verdict(self, verdict)
        _set_skill_id(self, skill_id)
        _set_agent_id(self, agent_id)
        _set_reason(self, reason)
        _set_policy(self, policy)
        _set_policy_index(self, policy_index)
        _set_observed(self, observed)
        _set_projected(self, projected)
        _set_limit(self, limit)
        _set_fail_closed(self, fail_closed)
        _set_shadow(self, shadow)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"Decision is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Decision is immutable; cannot delete {name!r}")

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def shadow_verdict(self) -> Verdict | None:
        """The verdict with shadow policies enforced, when one of them was breached first."""
        if not self.shadow:
            return None
        first = self.shadow[0]
        if self.policy_index is not None and (first.policy_index or 0) > self.policy_index:
            return None  # this decision's own policy comes first
        return first.verdict

    def with_shadow(self, shadow: tuple[Decision, ...]) -> Decision:
        """This decision, carrying ``shadow``."""
        values = [getattr(self, n) for n in _FIELDS]
        values[-1] = shadow
        return Decision(*values)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (decimals as strings, the policy as its YAML mapping)."""
        return {
            "verdict": self.verdict.value,
            "skill_id": self.skill_id,
            "agent_id": self.agent_id,
            "reason": self.reason,
            "policy": None if self.policy is None else self.policy.to_yaml_dict(),
            "policy_index": self.policy_index,
            "observed": decimal_text(self.observed),
            "projected": decimal_text(self.projected),
            "limit": decimal_text(self.limit),
            "fail_closed": self.fail_closed,
            **({"shadow": [d.to_dict() for d in self.shadow]} if self.shadow else {}),
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash((self.verdict, self.skill_id, self.agent_id, self.reason, self.policy_index))

    def __repr__(self) -> str:
        return (
            f"Decision(verdict={self.verdict.value}, skill_id={self.skill_id!r}, "
            f"agent_id={self.agent_id!r}, policy_index={self.policy_index!r}, "
            f"reason={self.reason!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (Decision, tuple(getattr(self, n) for n in _FIELDS))


_FIELDS = (
    "verdict",
    "skill_id",
    "agent_id",
    "reason",
    "policy",
    "policy_index",
    "observed",
    "projected",
    "limit",
    "fail_closed",
    "shadow",
)


def _setter(name: str) -> Callable[[Decision, Any], None]:
    descriptor: Any = Decision.__dict__[name]
    setter: Callable[[Decision, Any], None] = descriptor.__set__
    return setter


_set_verdict = _setter("verdict")
_set_skill_id = _setter("skill_id")
_set_agent_id = _setter("agent_id")
_set_reason = _setter("reason")
_set_policy = _setter("policy")
_set_policy_index = _setter("policy_index")
_set_observed = _setter("observed")
_set_projected = _setter("projected")
_set_limit = _setter("limit")
_set_fail_closed = _setter("fail_closed")
_set_shadow = _setter("shadow")


def decimal_text(value: Decimal | None) -> str | None:
    """An exact decimal as plain text (``"0.10"``, never ``"1E-1"``), ``None`` kept."""
    return None if value is None else format(value, "f")


def allowed_decision(skill_id: str, agent_id: str) -> Decision:
    """The ALLOW decision of a call of ``skill_id`` by ``agent_id`` that breached no policy."""
    return Decision(Verdict.ALLOW, skill_id, agent_id, allowed_reason(skill_id))


def allowed_reason(skill_id: str) -> str:
    """The reason of an ALLOW: one sentence, as every decision has."""
    return f"{skill_id}: allowed, no policy was breached."
