"""The core every framework adapter shares: governed tool calls, keyed requests, answers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from limenex.approvals import ApprovalStatus
from limenex.approvals.request import request_id_for
from limenex.core.decision import Verdict
from limenex.core.engine import PolicyEngine
from limenex.core.errors import InvalidArgumentError, LimenexConfigError
from limenex.core.policy_store import LocalFilePolicyStore
from limenex.integrations import call, decide, handle_of, read_answer, tool_name
from limenex.skills.finance import make_spend

POLICIES = """\
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 1000
      breach_verdict: BLOCK
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 50
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_calls
      operator: lte
      value: 3
      breach_verdict: ESCALATE
tools.deploy:
  policies:
    - type: deterministic
      dimension: deployable
      param: service
      operator: in
      values: [web]
      breach_verdict: ESCALATE
"""


@pytest.fixture(params=["memory", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> PolicyEngine:
    (tmp_path / "policies.yaml").write_text(POLICIES)
    state = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/state.db"
    built = PolicyEngine(LocalFilePolicyStore(tmp_path / "policies.yaml"), state)
    yield built  # type: ignore[misc]
    built.close()


def _spend(engine: PolicyEngine) -> tuple[Any, list[Any]]:
    paid: list[Any] = []
    return make_spend(
        engine, {"openai": lambda amount_usd: paid.append(amount_usd) or "paid"}
    ), paid


async def test_allow_block_and_escalate_become_outcomes(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    allowed = await call(handle, "a", {"service": "openai", "amount_usd": 30})
    assert (allowed.verdict, allowed.result) == (Verdict.ALLOW, "paid")
    blocked = await call(handle, "a", {"service": "openai", "amount_usd": 5000})
    assert blocked.verdict is Verdict.BLOCK
    assert blocked.refusal().startswith("BLOCK: finance.spend: spend_usd")
    escalated = await call(handle, "a", {"service": "openai", "amount_usd": 30})
    assert escalated.verdict is Verdict.ESCALATE
    assert escalated.request is not None
    assert escalated.request.status is ApprovalStatus.PENDING
    payload = escalated.interrupt_payload()
    assert payload["request_id"] == escalated.request_id
    assert payload["skill"] == "finance.spend"
    assert payload["params"] == {"agent_id": "a", "service": "openai", "amount_usd": 30}
    assert escalated.request_id in escalated.refusal()
    assert paid == [30]


async def test_a_key_finds_the_request_its_first_call_made(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    await call(handle, "a", {"service": "openai", "amount_usd": 50})
    first = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="t:1")
    again = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="t:1")
    assert first.request_id == again.request_id == request_id_for("t:1")
    assert len(await engine.approvals.pending()) == 1
    done = await decide(handle, first.request_id or "", {"decision": "approve", "approver": "al"})
    assert (done.verdict, done.result) == (Verdict.ALLOW, "paid")
    assert paid == [50, 10]
    used = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="t:1")
    assert used.verdict is Verdict.BLOCK
    assert "used" in used.reason
    assert paid == [50, 10]  # never twice


async def test_deny_refuses_and_records_who_and_why(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    await call(handle, "a", {"service": "openai", "amount_usd": 50})
    asked = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="k")
    denied = await decide(
        handle, asked.request_id or "", {"decision": "deny", "approver": "bo", "note": "no"}
    )
    assert denied.verdict is Verdict.BLOCK
    assert denied.reason == "a human (bo) denied the action: no"
    again = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="k")
    assert again.verdict is Verdict.BLOCK
    assert "denied" in again.reason
    request = await engine.approvals.get(asked.request_id or "")
    assert request is not None
    assert request.status is ApprovalStatus.DENIED
    assert paid == [50]


async def test_a_second_escalate_on_resume_is_keyed_by_next_key(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    for _ in range(3):
        await call(handle, "a", {"service": "openai", "amount_usd": 1})
    # $3 + $60 breaks the $50 ESCALATE; once approved, the 4th call breaks the 3-call one
    first = await call(handle, "a", {"service": "openai", "amount_usd": 60}, key="c")
    assert first.request is not None
    assert first.request.policy_index == 1
    second = await decide(
        handle, first.request_id or "", {"decision": "approve", "approver": "al"}, next_key="c#1"
    )
    assert second.verdict is Verdict.ESCALATE
    assert second.request_id == request_id_for("c#1")
    assert second.request is not None
    assert second.request.policy_index == 2
    done = await decide(handle, second.request_id or "", {"decision": "approve", "approver": "al"})
    assert done.verdict is Verdict.ALLOW
    assert paid == [1, 1, 1, 60]


async def test_an_approval_given_elsewhere_is_resumed_not_approved_again(
    engine: PolicyEngine,
) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    await call(handle, "a", {"service": "openai", "amount_usd": 50})
    asked = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="k")
    await engine.approvals.approve(asked.request_id or "", approver="cli-user")
    done = await decide(handle, asked.request_id or "", {"decision": "approve", "approver": "x"})
    assert done.verdict is Verdict.ALLOW
    request = await engine.approvals.get(asked.request_id or "")
    assert request is not None
    assert request.decided_by == "cli-user"
    # denying what another human approved does not run it, and does not pretend it did not
    asked = await call(handle, "a", {"service": "openai", "amount_usd": 5}, key="k2")
    await engine.approvals.approve(asked.request_id or "", approver="cli-user")
    refused = await decide(handle, asked.request_id or "", {"decision": "deny", "approver": "x"})
    assert refused.verdict is Verdict.BLOCK
    assert paid == [50, 10]


async def test_concurrent_decisions_run_the_action_once(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    await call(handle, "a", {"service": "openai", "amount_usd": 50})
    asked = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="k")
    answer = {"decision": "approve", "approver": "al"}
    outcomes = await asyncio.gather(
        *(decide(handle, asked.request_id or "", answer) for _ in range(8))
    )
    assert [o.verdict for o in outcomes].count(Verdict.ALLOW) == 1
    assert paid == [50, 10]


async def test_the_model_cannot_name_the_agent(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    with pytest.raises(InvalidArgumentError, match="agent id"):
        await call(
            handle_of(spend), "a", {"agent_id": "root", "amount_usd": 1, "service": "openai"}
        )
    assert paid == []


async def test_governed_functions_sync_and_async(engine: PolicyEngine) -> None:
    ran: list[str] = []

    @engine.governed("tools.deploy")
    def deploy(agent_id: str, service: str) -> str:
        ran.append(service)
        return f"deployed {service}"

    @engine.governed("tools.deploy", name="adeploy")
    async def adeploy(agent_id: str, service: str) -> str:
        ran.append("async " + service)
        return f"deployed {service}"

    for fn in (deploy, adeploy):
        handle = handle_of(fn)
        assert list(handle.signature.parameters) == ["service"]
        assert (await call(handle, "a", {"service": "web"})).verdict is Verdict.ALLOW
        asked = await call(handle, "a", {"service": "db"}, key=f"k-{fn.__name__}")
        assert asked.verdict is Verdict.ESCALATE
        done = await decide(
            handle, asked.request_id or "", {"decision": "approve", "approver": "al"}
        )
        assert done.result == "deployed db"
    assert ran == ["web", "db", "async web", "async db"]


def test_answers_are_read_strictly() -> None:
    assert read_answer({"decision": "approve", "approver": "al"}) == (True, "al", None)
    assert read_answer({"decision": "deny", "approver": "al", "note": "n"}) == (False, "al", "n")
    for bad, argument in [
        ({"decision": "yes", "approver": "al"}, "decision"),
        ({"decision": "approve"}, "approver"),
        ({"decision": "approve", "approver": "  "}, "approver"),
        ({"decision": "approve", "approver": "al", "note": 3}, "note"),
        ({"decision": "approve", "approver": "al", "by": "x"}, "by"),
        ("approve", "answer"),
    ]:
        with pytest.raises(InvalidArgumentError) as caught:
            read_answer(bad)  # type: ignore[arg-type]
        assert caught.value.argument == argument


async def test_a_bad_answer_leaves_the_request_pending(engine: PolicyEngine) -> None:
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    await call(handle, "a", {"service": "openai", "amount_usd": 50})
    asked = await call(handle, "a", {"service": "openai", "amount_usd": 10}, key="k")
    with pytest.raises(InvalidArgumentError):
        await decide(handle, asked.request_id or "", {"decision": "maybe", "approver": "al"})
    request = await engine.approvals.get(asked.request_id or "")
    assert request is not None
    assert request.status is ApprovalStatus.PENDING
    assert paid == [50]


def test_tool_names_and_non_skills() -> None:
    assert tool_name("finance.spend") == "finance_spend"
    with pytest.raises(LimenexConfigError, match="not a governed skill"):
        handle_of(print)


async def test_a_key_reused_for_other_arguments_never_picks_up_the_request(
    engine: PolicyEngine,
) -> None:
    # A model chooses tool call ids: one reused for another call must not get the first
    # call's pending request approved in its name.
    spend, paid = _spend(engine)
    handle = handle_of(spend)
    await call(handle, "a", {"service": "openai", "amount_usd": 50})
    asked = await call(handle, "a", {"service": "openai", "amount_usd": 40}, key="c2")
    assert asked.verdict is Verdict.ESCALATE
    for other_agent, arguments in [
        ("a", {"service": "openai", "amount_usd": 1}),
        ("a", {"service": "openai", "amount_usd": 40.0001}),
        ("a", {"service": "openai"}),
        ("b", {"service": "openai", "amount_usd": 40}),
    ]:
        reused = await call(handle, other_agent, arguments, key="c2")
        assert reused.verdict is Verdict.BLOCK
        assert "already used by another call" in reused.reason
    same = await call(handle, "a", {"amount_usd": 40, "service": "openai"}, key="c2")
    assert same.request_id == asked.request_id
    request = await engine.approvals.get(asked.request_id or "")
    assert request is not None
    assert request.status is ApprovalStatus.PENDING
    assert paid == [50]


async def test_a_key_picks_up_a_governed_functions_request_with_its_defaults(
    engine: PolicyEngine,
) -> None:
    @engine.governed("tools.deploy")
    def deploy(agent_id: str, service: str, region: str = "eu") -> str:
        return f"deployed {service} in {region}"

    handle = handle_of(deploy)
    asked = await call(handle, "a", {"service": "db"}, key="d")
    assert (await call(handle, "a", {"service": "db"}, key="d")).request_id == asked.request_id
    assert (await call(handle, "a", {"service": "db", "region": "eu"}, key="d")).request_id == (
        asked.request_id
    )
    other = await call(handle, "a", {"service": "db", "region": "us"}, key="d")
    assert other.verdict is Verdict.BLOCK
