"""Built-in skills: thin factories that put a governed call in front of an executor.

The agent names the provider/service in plain data; the executor registry maps that name to
the function that acts, and the agent never sees it. The executor receives the skill's
arguments except ``agent_id`` and the registry key. An unknown key raises
:class:`UnregisteredExecutorError` before any policy is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from limenex.core.errors import (
    InvalidArgumentError,
    LimenexConfigError,
    UnregisteredExecutorError,
)

__all__ = ["Executor", "ExecutorLookup", "UnregisteredExecutorError", "executor_lookup"]

Executor = Callable[..., Any]


def executor_lookup(
    skill_id: str, key_param: str, registry: Mapping[str, Executor]
) -> ExecutorLookup:
    """Snapshot and check ``registry``; return ``key -> executor`` that refuses unknown keys."""
    return ExecutorLookup(skill_id, key_param, registry)


class ExecutorLookup:
    """``key -> executor`` over a snapshot of a registry; unknown keys are refused.

    ``identity`` is what :meth:`~limenex.core.engine.PolicyEngine.register_action` compares:
    two skills made on one engine from registries that differ cannot share a name, since a
    resumed request could not tell which one it was made by.
    """

    __slots__ = ("identity", "key_param", "known", "skill_id", "table")

    def __init__(self, skill_id: str, key_param: str, registry: Mapping[str, Executor]) -> None:
        if not isinstance(registry, Mapping):
            raise LimenexConfigError(
                f"{skill_id}: the executor registry must be a mapping of {key_param} -> callable"
            )
        table: dict[str, Executor] = {}
        for key, executor in registry.items():
            if not isinstance(key, str) or not key:
                raise LimenexConfigError(f"{skill_id}: registry keys must be non-empty strings")
            if not callable(executor):
                raise LimenexConfigError(f"{skill_id}: the executor for {key!r} is not callable")
            table[key] = executor
        self.skill_id = skill_id
        self.key_param = key_param
        self.table = table
        self.known = ", ".join(sorted(table)) or "none"
        self.identity = frozenset(table.items())

    def __call__(self, key: object) -> Executor:
        executor = self.table.get(key) if type(key) is str else None
        if executor is not None:
            return executor
        if type(key) is not str:
            raise InvalidArgumentError(
                f"argument {self.key_param!r} must be a string, got {type(key).__name__} {key!r}",
                argument=self.key_param,
            )
        raise UnregisteredExecutorError(
            f"{self.skill_id}: no executor is registered for {self.key_param} {key!r}"
            f" (registered: {self.known})"
        )
