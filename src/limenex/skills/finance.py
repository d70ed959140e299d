"""Money: ``finance.spend`` (a service bill in US dollars) and ``finance.charge``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from limenex.core.engine import PolicyEngine
from limenex.core.handle import SkillHandle
from limenex.skills import Executor, executor_lookup

__all__ = ["make_charge", "make_spend"]

Amount = int | float | Decimal


def make_spend(
    engine: PolicyEngine, registry: Mapping[str, Executor], *, name: str = ""
) -> Callable[..., Awaitable[Any]]:
    """``await spend(agent_id=, service=, amount_usd=)``; the executor gets ``amount_usd=``.

    ``name`` tells apart two registries made into this skill on one engine (see
    :meth:`~limenex.core.engine.PolicyEngine.register_action`).
    """
    lookup = executor_lookup("finance.spend", "service", registry)

    def action(params: dict[str, Any]) -> Callable[[], Any]:
        executor = lookup(params["service"])
        return lambda: executor(amount_usd=params["amount_usd"])

    engine.register_action("finance.spend", action, name=name, executor=lookup.identity)

    async def spend(*, agent_id: str, service: str, amount_usd: Amount) -> Any:
        """Spend ``amount_usd`` US dollars on ``service``, if the policies allow it."""
        executor = lookup(service)
        params = {"agent_id": agent_id, "service": service, "amount_usd": amount_usd}
        return await engine.execute(
            "finance.spend",
            agent_id,
            params,
            lambda: executor(amount_usd=amount_usd),
            action_name=name,
        )

    spend.skill_id = "finance.spend"  # type: ignore[attr-defined]
    spend.__limenex__ = SkillHandle(engine, "finance.spend", spend)  # type: ignore[attr-defined]
    return spend


def make_charge(
    engine: PolicyEngine, registry: Mapping[str, Executor], *, name: str = ""
) -> Callable[..., Awaitable[Any]]:
    """``await charge(agent_id=, provider=, amount=, currency=)``.

    The executor gets ``amount=, currency=``.
    """
    lookup = executor_lookup("finance.charge", "provider", registry)

    def action(params: dict[str, Any]) -> Callable[[], Any]:
        executor = lookup(params["provider"])
        return lambda: executor(amount=params["amount"], currency=params["currency"])

    engine.register_action("finance.charge", action, name=name, executor=lookup.identity)

    async def charge(*, agent_id: str, provider: str, amount: Amount, currency: str) -> Any:
        """Charge ``amount`` in ``currency`` through ``provider``, if the policies allow it."""
        executor = lookup(provider)
        params = {
            "agent_id": agent_id,
            "provider": provider,
            "amount": amount,
            "currency": currency,
        }
        return await engine.execute(
            "finance.charge",
            agent_id,
            params,
            lambda: executor(amount=amount, currency=currency),
            action_name=name,
        )

    charge.skill_id = "finance.charge"  # type: ignore[attr-defined]
    charge.__limenex__ = SkillHandle(engine, "finance.charge", charge)  # type: ignore[attr-defined]
    return charge
