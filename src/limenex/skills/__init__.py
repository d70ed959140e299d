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

__all__ = ["Executor", "UnregisteredExecutorError", "executor_lookup"]

Executor = Callable[..., Any]


def executor_lookup(
    skill_id: str, key_param: str, registry: Mapping[str, Executor]
) -> Callable[[object], Executor]:
    """Snapshot and check ``registry``; return ``key -> executor`` that refuses unknown keys."""
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
    known = ", ".join(sorted(table)) or "none"

    def lookup(key: object) -> Executor:
        executor = table.get(key) if type(key) is str else None
        if executor is not None:
            return executor
        if type(key) is not str:
            raise InvalidArgumentError(
                f"argument {key_param!r} must be a string, got {type(key).__name__} {key!r}",
                argument=key_param,
            )
        raise UnregisteredExecutorError(
            f"{skill_id}: no executor is registered for {key_param} {key!r} (registered: {known})"
        )

    return lookup
