"""Outbound HTTP: ``web.post`` to a named destination."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from limenex.core.engine import PolicyEngine
from limenex.core.handle import SkillHandle
from limenex.skills import Executor, executor_lookup

__all__ = ["make_post"]


def make_post(
    engine: PolicyEngine, registry: Mapping[str, Executor], *, name: str = ""
) -> Callable[..., Awaitable[Any]]:
    """``await post(agent_id=, destination=, payload=)``; the executor gets ``payload=``."""
    lookup = executor_lookup("web.post", "destination", registry)

    def action(params: dict[str, Any]) -> Callable[[], Any]:
        executor = lookup(params["destination"])
        return lambda: executor(payload=params["payload"])

    engine.register_action("web.post", action, name=name, executor=lookup.identity)

    async def post(*, agent_id: str, destination: str, payload: Any) -> Any:
        """Post ``payload`` to ``destination``, if the policies allow it."""
        executor = lookup(destination)
        params = {"agent_id": agent_id, "destination": destination, "payload": payload}
        return await engine.execute(
            "web.post", agent_id, params, lambda: executor(payload=payload), action_name=name
        )

    post.skill_id = "web.post"  # type: ignore[attr-defined]
    post.__limenex__ = SkillHandle(engine, "web.post", post)  # type: ignore[attr-defined]
    return post
