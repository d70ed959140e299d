"""What an integration needs to know about a governed callable: its engine, skill and agent."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from limenex.core.errors import LimenexConfigError

if TYPE_CHECKING:
    from limenex.core.engine import PolicyEngine

__all__ = ["SkillHandle", "handle_of"]


class SkillHandle:
    """A governed callable's engine, skill id and the parameter that names the agent.

    The skill factories and :meth:`~limenex.core.engine.PolicyEngine.governed` attach one as
    ``fn.__limenex__``. ``signature`` is the callable's signature without the agent
    parameter: what a model may fill in.
    """

    __slots__ = ("agent_id_param", "engine", "fn", "is_async", "signature", "skill_id")

    def __init__(
        self,
        engine: PolicyEngine,
        skill_id: str,
        fn: Callable[..., Any],
        agent_id_param: str = "agent_id",
    ) -> None:
        self.engine = engine
        self.skill_id = skill_id
        self.fn = fn
        self.agent_id_param = agent_id_param
        self.is_async = inspect.iscoroutinefunction(fn)
        full = inspect.signature(fn)
        self.signature = full.replace(
            parameters=[p for name, p in full.parameters.items() if name != agent_id_param]
        )

    async def call(self, agent_id: str, arguments: dict[str, Any]) -> Any:
        """Call the governed callable for ``agent_id`` with keyword ``arguments``."""
        kwargs = {**arguments, self.agent_id_param: agent_id}
        if self.is_async:
            return await self.fn(**kwargs)
        return await asyncio.to_thread(self.fn, **kwargs)  # in this context: a request key

    def __repr__(self) -> str:
        return f"<SkillHandle {self.skill_id} ({self.fn.__qualname__})>"


def handle_of(fn: object) -> SkillHandle:
    """The :class:`SkillHandle` of a skill or ``@engine.governed`` function, or a clear error."""
    handle = getattr(fn, "__limenex__", None)
    if isinstance(handle, SkillHandle):
        return handle
    raise LimenexConfigError(
        f"{fn!r} is not a governed skill: pass what make_spend()/make_send()/... return, "
        "or a function decorated with @engine.governed(...)"
    )
