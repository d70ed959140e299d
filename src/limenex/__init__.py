"""Limenex: deterministic, stateful policy enforcement between AI agents and the real world."""

from limenex.core.decision import Decision, Verdict
from limenex.core.engine import PolicyEngine
from limenex.core.errors import (
    BlockedError,
    CorruptStateError,
    EscalationRequired,
    EvaluatorError,
    GovernanceSignal,
    InvalidArgumentError,
    LimenexConfigError,
    LimenexError,
    LimenexRuntimeError,
    PolicyFileError,
    StateStoreError,
    UnregisteredExecutorError,
    UnregisteredSkillError,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "BlockedError",
    "CorruptStateError",
    "Decision",
    "EscalationRequired",
    "EvaluatorError",
    "GovernanceSignal",
    "InvalidArgumentError",
    "LimenexConfigError",
    "LimenexError",
    "LimenexRuntimeError",
    "PolicyEngine",
    "PolicyFileError",
    "StateStoreError",
    "UnregisteredExecutorError",
    "UnregisteredSkillError",
    "Verdict",
    "__version__",
]
