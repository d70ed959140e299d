"""Every error Limenex raises, under one root.

::

    LimenexError                      root: ``except LimenexError`` catches everything of ours
    ├── LimenexConfigError            the setup or the call is wrong; retrying will not help
    │   ├── PolicyFileError           a policy file is malformed (names file, line and key)
    │   ├── UnregisteredSkillError    the skill id has no entry in the policy file
    │   ├── UnregisteredExecutorError the registry has no executor for that provider/service
    │   └── InvalidArgumentError      a call argument is missing or of the wrong type/value
    ├── LimenexRuntimeError           something broke while governing a call
    │   ├── StateStoreError           the state store is unreachable or failed
    │   │   └── CorruptStateError     the stored state cannot be trusted; kept as found
    │   └── EvaluatorError            a semantic evaluator failed, timed out or answered garbage
    └── GovernanceSignal              the engine said no: the executor did not run
        ├── BlockedError              verdict BLOCK (including every fail-closed path)
        └── EscalationRequired        verdict ESCALATE: a human has to decide

A governed call never lets a runtime failure through as ALLOW. The engine turns it into a
``BlockedError`` whose ``decision.fail_closed`` is true and whose ``__cause__`` is the
``LimenexRuntimeError`` that happened, so an agent loop that handles ``BlockedError`` handles
outages too, and operators can still tell the two apart.

Errors raised for a specific call carry the full :class:`~limenex.core.decision.Decision`
as ``.decision`` (``.result`` is the 0.1.0 name of the same object). Errors raised while
loading configuration have ``decision = None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from limenex.core.decision import Decision

__all__ = [
    "BlockedError",
    "CorruptStateError",
    "EscalationRequired",
    "EvaluatorError",
    "GovernanceSignal",
    "InvalidArgumentError",
    "LimenexConfigError",
    "LimenexError",
    "LimenexRuntimeError",
    "PolicyFileError",
    "StateStoreError",
    "UnregisteredExecutorError",
    "UnregisteredSkillError",
]


class LimenexError(Exception):
    """Root of every Limenex error."""

    decision: Decision | None

    def __init__(self, message: str, *, decision: Decision | None = None) -> None:
        super().__init__(message)
        self.decision = decision

    @property
    def result(self) -> Decision | None:
        """The 0.1.0 name of :attr:`decision`."""
        return self.decision


# --- configuration mistakes -------------------------------------------------------------


class LimenexConfigError(LimenexError):
    """The configuration or the call is wrong. Fix the code or the policy file."""


class PolicyFileError(LimenexConfigError):
    """A policy file failed to load. ``str()`` reads ``file:line: key: problem``."""

    def __init__(
        self,
        problem: str,
        *,
        path: str,
        line: int | None = None,
        key: str | None = None,
        suggestion: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = path
        self.line = line
        self.key = key
        self.suggestion = suggestion
        where = path if line is None else f"{path}:{line}"
        text = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        if suggestion:
            text += f" ({suggestion})"
        super().__init__(text)


class UnregisteredSkillError(LimenexConfigError):
    """The skill has no entry in the policy file, so it is refused: nothing runs ungoverned."""


class UnregisteredExecutorError(LimenexConfigError):
    """The executor registry has no entry for the provider/service the agent named."""


class InvalidArgumentError(LimenexConfigError, ValueError):
    """A call argument is missing, of the wrong type or out of range. Names the argument."""

    def __init__(self, message: str, *, argument: str, decision: Decision | None = None) -> None:
        super().__init__(message, decision=decision)
        self.argument = argument


# --- runtime failures ---------------------------------------------------------------------


class LimenexRuntimeError(LimenexError):
    """Something broke while governing a call. The call was blocked, never allowed."""


class StateStoreError(LimenexRuntimeError):
    """The state store is unreachable or an operation on it failed."""


class CorruptStateError(StateStoreError):
    """The stored state is unreadable or not ours. It is kept as found for a human to see."""


class EvaluatorError(LimenexRuntimeError):
    """A semantic evaluator raised, timed out or gave an answer that could not be parsed."""


# --- control signals ----------------------------------------------------------------------


class GovernanceSignal(LimenexError):
    """The engine refused the action; the executor did not run."""

    decision: Decision

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason, decision=decision)
        self.decision = decision


class BlockedError(GovernanceSignal):
    """Verdict BLOCK: a hard stop, including every fail-closed path."""


class EscalationRequired(GovernanceSignal):
    """Verdict ESCALATE: the action is paused until a human decides.

    ``request_id`` names the persisted approval request when the engine keeps approvals,
    else it is ``None``.
    """

    def __init__(self, decision: Decision, request_id: str | None = None) -> None:
        super().__init__(decision)
        self.request_id = request_id
