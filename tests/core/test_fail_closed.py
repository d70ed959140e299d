"""Property: whatever breaks inside governance, the call ends in BLOCK and nothing runs."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limenex.core.decision import Verdict
from limenex.core.engine import BlockedError, PolicyEngine
from limenex.core.errors import StateStoreError
from limenex.core.policy import SkillPolicies
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import Check, Reservation, StateBreach
from limenex.core.stores import InMemoryStateStore

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 100
      breach_verdict: ESCALATE
    - type: semantic
      rule: "Block purchases that look unrelated to the task."
      breach_verdict: BLOCK
"""

FAULTS = ["policy_store", "reserve", "evaluator", "audit"]
ERRORS = [StateStoreError("down"), RuntimeError("bug"), OSError("io"), ValueError("bad")]


class FaultyStore(InMemoryStateStore):
    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        if self.error is not None:
            raise self.error
        return super().reserve(checks, now)


class FaultyPolicies(InMemoryPolicyStore):
    error: Exception | None = None

    def get(self, skill_id: str) -> SkillPolicies | None:
        if self.error is not None:
            raise self.error
        return super().get(skill_id)


@settings(max_examples=60, deadline=None)
@given(
    faults=st.sets(st.sampled_from(FAULTS), min_size=1),
    error=st.sampled_from(ERRORS),
    answer=st.sampled_from(["raise", "garbage", "hang", None, 42, {"verdict": "MAYBE"}]),
    sync=st.booleans(),
)
def test_any_internal_failure_ends_in_block_and_runs_nothing(
    faults: set[str], error: Exception, answer: Any, sync: bool
) -> None:
    policies = FaultyPolicies(InMemoryPolicyStore.from_yaml(POLICY).policy_set)
    if "policy_store" in faults:
        policies.error = error
    store = FaultyStore(error if "reserve" in faults else None)

    async def evaluator(intent: str, rule: str) -> Any:
        if "evaluator" not in faults:
            return "ALLOW"
        if answer == "raise":
            raise error
        if answer == "hang":
            await asyncio.sleep(5)
        return answer

    def audit(event: str, decision: Any, params: Any) -> None:
        if "audit" in faults:
            raise error

    engine = PolicyEngine(
        policy_store=policies,
        state_store=store,
        llm_evaluator=evaluator,
        audit_logger=audit,
        semantic_timeout=0.05,
    )
    ran: list[float] = []

    @engine.governed("finance.spend")
    def spend_sync(agent_id: str, service: str, amount_usd: float) -> None:
        ran.append(amount_usd)

    @engine.governed("finance.spend")
    async def spend_async(agent_id: str, service: str, amount_usd: float) -> None:
        ran.append(amount_usd)

    def call() -> None:
        if sync:
            spend_sync(agent_id="a", service="x", amount_usd=10.0)
        else:
            asyncio.run(spend_async(agent_id="a", service="x", amount_usd=10.0))

    try:
        with pytest.raises(BlockedError) as caught:
            call()
    finally:
        engine.close()

    assert caught.value.decision.verdict is Verdict.BLOCK
    assert ran == []
    assert {key: total for key, total in store.totals(0) if total} == {}
    assert store.pending(0) == []
