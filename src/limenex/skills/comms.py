"""Messages: ``comms.send`` over a named channel (email, Slack, SMS…)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from limenex.core.engine import PolicyEngine
from limenex.core.handle import SkillHandle
from limenex.skills import Executor, executor_lookup

__all__ = ["make_send"]


def make_send(
    engine: PolicyEngine, registry: Mapping[str, Executor], *, name: str = ""
) -> Callable[..., Awaitable[Any]]:
    """``await send(agent_id=, channel=, recipient=, text=)``; executor: ``recipient=, text=``."""
    lookup = executor_lookup("comms.send", "channel", registry)

    def action(params: dict[str, Any]) -> Callable[[], Any]:
        executor = lookup(params["channel"])
        return lambda: executor(recipient=params["recipient"], text=params["text"])

    engine.register_action("comms.send", action, name=name, executor=lookup.identity)

    async def send(*, agent_id: str, channel: str, recipient: str, text: str) -> Any:
        """Send ``text`` to ``recipient`` over ``channel``, if the policies allow it."""
        executor = lookup(channel)
        params = {"agent_id": agent_id, "channel": channel, "recipient": recipient, "text": text}
        return await engine.execute(
            "comms.send",
            agent_id,
            params,
            lambda: executor(recipient=recipient, text=text),
            action_name=name,
        )

    send.skill_id = "comms.send"  # type: ignore[attr-defined]
    send.__limenex__ = SkillHandle(engine, "comms.send", send)  # type: ignore[attr-defined]
    return send
