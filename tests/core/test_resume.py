"""ESCALATE you can act on: persisted requests, approve/deny, exactly-once resume (SPEC §5).

Every test runs on every state store (``tests/conftest.py``): the approval requests live
next to the state, so what one engine escalates another engine on the same state resumes.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from limenex.approvals import ApprovalRefused, ApprovalStatus, ApprovalStore, ApprovalStoreError
from limenex.approvals.request import ApprovalRequest
from limenex.audit import AuditLog, JsonlSink, verify
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import InvalidArgumentError, LimenexConfigError
from limenex.core.state import CounterKey, StateStore
from limenex.skills.finance import make_spend
from limenex.testing import FrozenClock

MakeEngine = Callable[..., PolicyEngine]

ESCALATE_OVER_20_BLOCK_AT_100 = """
finance.spend:
  policies:
    - type: deterministic
      dimension: amount_usd
      param: amount_usd
      operator: lte
      value: 20
      stateful: false
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 100
      breach_verdict: BLOCK
"""


def total(store: StateStore, dimension: str, agent: str = "agent-1") -> Decimal:
    return dict(store.totals(0)).get(CounterKey(dimension, "agent", agent, ""), Decimal(0))


class Ledger:
    """A fake payment provider that records what actually ran."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def pay(self, amount_usd: Any) -> dict[str, Any]:
        self.calls.append(amount_usd)
        return {"amount_usd": amount_usd}


async def escalate(spend: Any, amount: Any = 30, agent: str = "agent-1") -> str:
    with pytest.raises(EscalationRequired) as paused:
        await spend(agent_id=agent, service="stripe", amount_usd=amount)
    request_id = paused.value.request_id
    assert isinstance(request_id, str)
    assert len(request_id) >= 22
    return request_id


async def test_escalate_approve_resume_runs_exactly_once(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    ledger = Ledger()
    spend = make_spend(engine, {"stripe": ledger.pay})
    request_id = await escalate(spend, 30)
    assert ledger.calls == []
    assert total(state_store, "spend_usd") == 0  # nothing was counted for the paused call

    request = await engine.approvals.get(request_id)
    assert request is not None
    assert (request.skill_id, request.agent_id, request.status) == (
        "finance.spend",
        "agent-1",
        ApprovalStatus.PENDING,
    )
    assert request.params == {"agent_id": "agent-1", "amount_usd": 30, "service": "stripe"}
    assert request.policy is not None
    assert request.policy["dimension"] == "amount_usd"
    assert "amount_usd = 30 breaks" in request.reason
    assert request.expires_at == request.created_at + engine.approval_ttl
    assert [r.id for r in await engine.approvals.pending()] == [request_id]

    with pytest.raises(ApprovalRefused) as early:
        await engine.resume(request_id)
    assert early.value.why == "pending"
    assert ledger.calls == []

    approved = await engine.approvals.approve(request_id, approver="ops@example.com", note="ok")
    assert (approved.status, approved.decided_by, approved.note) == (
        ApprovalStatus.APPROVED,
        "ops@example.com",
        "ok",
    )
    assert await engine.approvals.pending() == []

    receipt = await engine.resume(request_id)
    assert receipt == {"amount_usd": 30}
    assert len(ledger.calls) == 1
    assert total(state_store, "spend_usd") == 30  # the amount is recorded
    used = await engine.approvals.get(request_id)
    assert used is not None
    assert used.status is ApprovalStatus.USED

    with pytest.raises(ApprovalRefused) as again:
        await engine.resume(request_id)
    assert again.value.why == "used"
    assert len(ledger.calls) == 1


async def test_a_block_policy_still_stops_an_approved_request(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    ledger = Ledger()
    spend = make_spend(engine, {"stripe": ledger.pay})
    request_id = await escalate(spend, 30)
    await engine.approvals.approve(request_id, approver="ops")
    for _ in range(4):  # 80 spent meanwhile, within every policy
        await spend(agent_id="agent-1", service="stripe", amount_usd=20)
    with pytest.raises(BlockedError) as blocked:
        await engine.resume(request_id)
    assert blocked.value.decision.policy_index == 1
    assert "spend_usd" in blocked.value.decision.reason
    assert len(ledger.calls) == 4
    assert total(state_store, "spend_usd") == 80
    # A hard no stays a hard no, and the approval is not spent by it.
    kept = await engine.approvals.get(request_id)
    assert kept is not None
    assert kept.status is ApprovalStatus.APPROVED


async def test_denied_expired_and_unknown_requests_never_run(
    make_engine: MakeEngine, clock: FrozenClock, state_store: StateStore
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100, approval_ttl=600)
    ledger = Ledger()
    spend = make_spend(engine, {"stripe": ledger.pay})
    denied = await escalate(spend, 30)
    await engine.approvals.deny(denied, approver="ops", note="no")
    late = await escalate(spend, 31)
    await engine.approvals.approve(late, approver="ops")
    never = await escalate(spend, 32)
    clock.advance(600)  # expiry is exactly at expires_at
    cases = {denied: "denied", late: "expired", never: "expired", "no-such-request": "unknown"}
    for request_id, why in cases.items():
        with pytest.raises(ApprovalRefused) as refused:
            await engine.resume(request_id)
        assert refused.value.why == why, request_id
        assert refused.value.request_id == request_id
        with pytest.raises(ApprovalRefused):
            engine.resume_sync(request_id)
    with pytest.raises(ApprovalRefused) as refused:
        await engine.approvals.approve(never, approver="ops")
    assert refused.value.why == "expired"
    assert ledger.calls == []
    assert total(state_store, "spend_usd") == 0


async def test_concurrent_resumes_run_the_action_once(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    ran: list[object] = []
    lock = threading.Lock()

    async def pay(amount_usd: object) -> str:
        await asyncio.sleep(0.01)
        ran.append(amount_usd)
        return "paid"

    def pay_sync(amount_usd: object) -> str:
        with lock:
            ran.append(amount_usd)
        return "paid"

    spend = make_spend(engine, {"stripe": pay})
    request_id = await escalate(spend, 30)
    await engine.approvals.approve(request_id, approver="ops")
    outcomes = await asyncio.gather(
        *(engine.resume(request_id) for _ in range(20)), return_exceptions=True
    )
    assert outcomes.count("paid") == 1
    # The others are refused: the request was used, or (reserving before the winner's amount
    # was released or committed) the BLOCK policy saw the racing reservations. Never a run.
    refusals = [o for o in outcomes if isinstance(o, ApprovalRefused | BlockedError)]
    assert len(refusals) == 19
    assert {r.why for r in refusals if isinstance(r, ApprovalRefused)} <= {"used"}
    assert ran == [30]

    # Threads, on the synchronous path, racing for a second approved request.
    sync_spend = make_spend(engine, {"stripe": pay_sync}, name="sync")  # another registry
    second = await escalate(sync_spend, 40)
    await engine.approvals.approve(second, approver="ops")
    results: list[object] = []

    def resume() -> None:
        try:
            results.append(engine.resume_sync(second))
        except ApprovalRefused as exc:
            results.append(exc.why)
        except BlockedError:
            results.append("blocked")

    threads = [threading.Thread(target=resume) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count("paid") == 1
    assert len(results) == 16
    assert set(results) <= {"paid", "used", "blocked"}
    assert ran == [30, 40]
    assert total(state_store, "spend_usd") == 70


async def test_a_new_engine_resumes_what_another_escalated(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    first = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    spend = make_spend(first, {"stripe": Ledger().pay})
    request_id = await escalate(spend, Decimal("30.10"))
    first.close()

    # "After a restart": a second engine on the same state, with the skill made again.
    second = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    got: list[object] = []
    make_spend(second, {"stripe": lambda amount_usd: got.append(amount_usd) or "done"})
    await second.approvals.approve(request_id, approver="ops")
    assert await second.resume(request_id) == "done"
    # The executor gets the Decimal back, not its text.
    assert got == [Decimal("30.10")]
    assert isinstance(got[0], Decimal)
    assert str(got[0]) == "30.10"
    assert total(state_store, "spend_usd") == Decimal("30.10")


async def test_resume_without_the_skill_made_is_a_clear_error(make_engine: MakeEngine) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    request_id = await escalate(make_spend(engine, {"stripe": Ledger().pay}), 30)
    other = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    await other.approvals.approve(request_id, approver="ops")
    with pytest.raises(Exception, match=r"no executor for skill 'finance\.spend'"):
        await other.resume(request_id)
    kept = await other.approvals.get(request_id)
    assert kept is not None
    assert kept.status is ApprovalStatus.APPROVED


async def test_a_failing_executor_on_resume_uses_the_approval_and_counts_nothing(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)

    def down(amount_usd: object) -> None:
        raise ConnectionError("provider down")

    request_id = await escalate(make_spend(engine, {"stripe": down}), 30)
    await engine.approvals.approve(request_id, approver="ops")
    with pytest.raises(ConnectionError, match="provider down"):
        await engine.resume(request_id)
    assert total(state_store, "spend_usd") == 0
    # It ran once: the approval was for one attempt; a retry needs a new escalation.
    with pytest.raises(ApprovalRefused) as again:
        await engine.resume(request_id)
    assert again.value.why == "used"


@pytest.mark.parametrize("kind", ["sync", "async", "failing"])
async def test_on_escalation_is_told_and_its_failure_loses_nothing(
    make_engine: MakeEngine, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[ApprovalRequest] = []

    def sync_notify(request: ApprovalRequest) -> None:
        told.append(request)

    async def async_notify(request: ApprovalRequest) -> None:
        await asyncio.sleep(0)
        told.append(request)

    def failing(request: ApprovalRequest) -> None:
        told.append(request)
        raise RuntimeError("chat is down")

    notify = {"sync": sync_notify, "async": async_notify, "failing": failing}[kind]
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100, on_escalation=notify)
    ledger = Ledger()
    spend = make_spend(engine, {"stripe": ledger.pay})
    with caplog.at_level(logging.ERROR, logger="limenex"):
        request_id = await escalate(spend, 30)
    assert [r.id for r in told] == [request_id]
    assert (kind == "failing") == ("on_escalation failed" in caplog.text)
    await engine.approvals.approve(request_id, approver="ops")
    await engine.resume(request_id)
    assert len(ledger.calls) == 1


def test_governed_functions_resume_sync_and_async(make_engine: MakeEngine) -> None:
    engine = make_engine(
        """
        ops.restart:
          policies:
            - type: deterministic
              dimension: restarts
              operator: lt
              value: 1
              breach_verdict: ESCALATE
        """
    )
    restarted: list[tuple[str, str]] = []

    @engine.governed("ops.restart")
    def restart(service: str, /, agent_id: str, *, reason: str = "") -> str:
        restarted.append((service, reason))
        return f"restarted {service}"

    with pytest.raises(EscalationRequired) as paused:
        restart("db", agent_id="agent-1", reason="stuck")
    request_id = paused.value.request_id
    assert request_id is not None
    engine.approvals.approve_sync(request_id, approver="ops")
    assert engine.resume_sync(request_id) == "restarted db"
    assert restarted == [("db", "stuck")]


async def test_an_approval_store_failure_blocks_the_escalation(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    class Broken(ApprovalStore):
        def create(self, request: ApprovalRequest) -> None:
            raise ApprovalStoreError("approval database unreachable")

        def get(self, request_id: str, now: float) -> ApprovalRequest | None:
            raise ApprovalStoreError("approval database unreachable")

        def pending(self, now: float) -> list[ApprovalRequest]:
            raise ApprovalStoreError("approval database unreachable")

        def transition(self, step: Any, request_id: str) -> ApprovalRequest:
            raise ApprovalStoreError("approval database unreachable")

    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100, approval_store=Broken())
    spend = make_spend(engine, {"stripe": Ledger().pay})
    with pytest.raises(BlockedError) as blocked:
        await spend(agent_id="agent-1", service="stripe", amount_usd=30)
    assert blocked.value.decision.fail_closed
    assert "approval store" in blocked.value.decision.reason
    with pytest.raises(ApprovalStoreError):
        await engine.resume("anything")


async def test_the_whole_story_is_in_a_verifiable_audit_log(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    path = tmp_path / "audit.log"
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100, audit_logger=AuditLog(JsonlSink(path)))
    spend = make_spend(engine, {"stripe": Ledger().pay})
    request_id = await escalate(spend, 30)
    await engine.approvals.approve(request_id, approver="ops")
    await engine.resume(request_id)
    with pytest.raises(ApprovalRefused):
        await engine.resume(request_id)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == [
        "escalated",
        "approved",
        "allowed",
        "resumed",
        "executed",
        "refused",
    ]
    assert records[5]["extra"]["why"] == "used"
    assert {records[i]["extra"].get("request_id") for i in (0, 1, 3, 5)} == {request_id}
    assert records[1]["extra"]["decided_by"] == "ops"
    assert records[4]["extra"]["state"][0]["after"] == "30"
    assert verify(path).ok


def test_the_default_audit_log_sits_beside_the_state(tmp_path: Path) -> None:
    policy = tmp_path / "policies.yaml"
    policy.write_text(ESCALATE_OVER_20_BLOCK_AT_100)
    engine = PolicyEngine(policy)  # SQLite state.db and audit.log beside the policy file
    spend = make_spend(engine, {"stripe": Ledger().pay})
    asyncio.run(spend(agent_id="agent-1", service="stripe", amount_usd=5))
    with pytest.raises(EscalationRequired):
        asyncio.run(spend(agent_id="agent-1", service="stripe", amount_usd=30))
    engine.close()  # flushes the buffered log
    result = verify(tmp_path / "audit.log")
    assert (result.ok, result.count) == (True, 2)
    events = [
        json.loads(line)["event"] for line in (tmp_path / "audit.log").read_text().splitlines()
    ]
    assert events == ["executed", "escalated"]


def test_two_functions_governed_as_one_skill_never_stand_in_for_each_other(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        """
        payments:
          policies:
            - type: deterministic
              dimension: amount
              param: amount
              operator: lte
              value: 100
              stateful: false
              breach_verdict: ESCALATE
        """
    )
    ran: list[str] = []

    @engine.governed("payments")
    def refund_customer(customer: str, amount: int, agent_id: str) -> str:
        ran.append(f"refund {customer} {amount}")
        return "refunded"

    @engine.governed("payments")
    def pay_vendor(customer: str, amount: int, agent_id: str) -> str:
        ran.append(f"pay {customer} {amount}")
        return "paid"

    with pytest.raises(EscalationRequired) as paused:
        refund_customer("ACME", 500, agent_id="agent-1")
    request_id = paused.value.request_id
    assert request_id is not None
    engine.approvals.approve_sync(request_id, approver="ops")
    assert engine.resume_sync(request_id) == "refunded"
    assert ran == ["refund ACME 500"]


def test_a_keyword_that_shadows_a_positional_only_argument_is_refused(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        """
        payments:
          policies:
            - type: deterministic
              dimension: amount
              param: amount
              operator: lte
              value: 100
              stateful: false
              breach_verdict: BLOCK
        """
    )
    ran: list[object] = []

    @engine.governed("payments")
    def pay(amount: int, /, agent_id: str, **meta: object) -> None:
        ran.append(amount)

    with pytest.raises(InvalidArgumentError, match="given twice") as refused:
        pay(1_000_000, agent_id="agent-1", amount=1)
    assert refused.value.argument == "amount"
    assert ran == []


def test_a_function_with_star_args_resumes_with_the_same_arguments(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        """
        ops.deploy:
          policies:
            - type: deterministic
              dimension: deploys
              operator: lt
              value: 1
              breach_verdict: ESCALATE
        """
    )
    ran: list[tuple[object, ...]] = []

    @engine.governed("ops.deploy")
    def deploy(target: str, *services: str, agent_id: str, dry: bool = False) -> str:
        ran.append((target, services, dry))
        return "deployed"

    with pytest.raises(EscalationRequired) as paused:
        deploy("prod", "api", "web", agent_id="agent-1")
    request_id = paused.value.request_id
    assert request_id is not None
    engine.approvals.approve_sync(request_id, approver="ops")
    assert engine.resume_sync(request_id) == "deployed"
    assert ran == [("prod", ("api", "web"), False)]


async def test_only_the_approved_escalate_policy_is_waived(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    engine = make_engine(
        """
        finance.spend:
          policies:
            - type: deterministic
              dimension: amount_usd
              param: amount_usd
              operator: lte
              value: 100
              stateful: false
              breach_verdict: ESCALATE
            - type: deterministic
              dimension: approved_services
              param: service
              operator: in
              values: [stripe]
              breach_verdict: ESCALATE
        """
    )
    ledger = Ledger()
    spend = make_spend(engine, {"stripe": ledger.pay, "wire": ledger.pay})
    request_id = await escalate_service(spend, "wire", 500)
    first = await engine.approvals.get(request_id)
    assert first is not None
    assert first.policy_index == 0  # the human saw "500 > 100", nothing about the service
    await engine.approvals.approve(request_id, approver="ops")
    with pytest.raises(EscalationRequired) as again:
        await engine.resume(request_id)
    assert again.value.decision.policy_index == 1  # the service asks a human too, separately
    second = again.value.request_id
    assert second not in (None, request_id)
    assert ledger.calls == []
    # The first approval is carried into the second request: it waives both policies.
    first_now = await engine.approvals.get(request_id)
    assert first_now is not None
    assert first_now.status is ApprovalStatus.USED
    carried = await engine.approvals.get(str(second))
    assert carried is not None
    assert (carried.policy_index, carried.waived) == (1, (0,))
    with pytest.raises(ApprovalRefused):
        await engine.resume(request_id)
    await engine.approvals.approve(str(second), approver="ops")
    await engine.resume(str(second))
    assert ledger.calls == [500]


async def test_an_approval_does_not_outlive_an_edit_of_the_policies(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    first = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    request_id = await escalate(make_spend(first, {"stripe": Ledger().pay}), 30)
    await first.approvals.approve(request_id, approver="ops")
    edited = make_engine(ESCALATE_OVER_20_BLOCK_AT_100.replace("value: 20", "value: 25"))
    ledger = Ledger()
    make_spend(edited, {"stripe": ledger.pay})
    with pytest.raises(ApprovalRefused) as refused:
        await edited.resume(request_id)
    assert refused.value.why == "policies"
    assert ledger.calls == []
    kept = await edited.approvals.get(request_id)
    assert kept is not None
    assert kept.status is ApprovalStatus.APPROVED  # refused, not spent


async def escalate_service(spend: Any, service: str, amount: int) -> str:
    with pytest.raises(EscalationRequired) as paused:
        await spend(agent_id="agent-1", service=service, amount_usd=amount)
    assert paused.value.request_id is not None
    return paused.value.request_id


async def test_a_failing_audit_log_at_resume_leaves_the_approval_unspent(
    make_engine: MakeEngine, tmp_path: Path
) -> None:
    from limenex.audit import AuditError, AuditRecord, MemorySink

    class Flaky(MemorySink):
        down = False

        def append(self, record: AuditRecord) -> AuditRecord:
            if self.down and record.event == "allowed":
                raise AuditError("disk full")
            return super().append(record)

    sink = Flaky()
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100, audit_logger=AuditLog(sink))
    ledger = Ledger()
    request_id = await escalate(make_spend(engine, {"stripe": ledger.pay}), 30)
    await engine.approvals.approve(request_id, approver="ops")
    sink.down = True
    with pytest.raises(BlockedError, match="audit"):
        await engine.resume(request_id)
    kept = await engine.approvals.get(request_id)
    assert kept is not None
    assert kept.status is ApprovalStatus.APPROVED
    sink.down = False
    await engine.resume(request_id)
    assert len(ledger.calls) == 1


def test_resume_sync_runs_an_async_executor_to_its_end(make_engine: MakeEngine) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    paid: list[object] = []

    async def pay(amount_usd: object) -> str:
        await asyncio.sleep(0)
        paid.append(amount_usd)
        return "paid"

    request_id = asyncio.run(escalate(make_spend(engine, {"stripe": pay}), 30))
    engine.approvals.approve_sync(request_id, approver="ops")
    assert engine.resume_sync(request_id) == "paid"
    assert paid == [30]


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="unset")


def test_resume_sync_runs_an_async_executor_in_the_callers_context(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    seen: list[str] = []

    async def pay(amount_usd: object) -> str:
        seen.append(_CALLER.get())
        return "paid"

    request_id = asyncio.run(escalate(make_spend(engine, {"stripe": pay}), 30))
    engine.approvals.approve_sync(request_id, approver="ops")
    _CALLER.set("the resuming thread")
    assert engine.resume_sync(request_id) == "paid"
    assert seen == ["the resuming thread"]


async def test_an_approved_cumulative_limit_counts_the_amount_past_it(
    make_engine: MakeEngine, state_store: StateStore
) -> None:
    engine = make_engine(
        """
        finance.spend:
          policies:
            - type: deterministic
              dimension: spend_usd
              param: amount_usd
              operator: lt
              value: 25
              breach_verdict: ESCALATE
        """
    )
    ledger = Ledger()
    spend = make_spend(engine, {"stripe": ledger.pay})
    request_id = await escalate(spend, 30)
    await engine.approvals.approve(request_id, approver="ops")
    await engine.resume(request_id)
    assert total(state_store, "spend_usd") == 30  # past the limit the human waived, once
    await escalate(spend, 1)  # the next call is over the limit again: a human again
    assert len(ledger.calls) == 1


def test_closures_of_one_factory_need_their_own_names(make_engine: MakeEngine) -> None:
    engine = make_engine(
        """
        payments:
          policies:
            - type: deterministic
              dimension: amount
              param: amount
              operator: lte
              value: 100
              stateful: false
              breach_verdict: ESCALATE
        """
    )
    sent: list[str] = []

    def make_sender(account: str) -> Callable[..., str]:
        def send(amount: int, agent_id: str) -> str:
            sent.append(f"{amount} from {account}")
            return account

        return send

    petty = engine.governed("payments", name="send:petty-cash")(make_sender("petty-cash"))
    engine.governed("payments")(make_sender("treasury"))  # the default name: module.qualname
    with pytest.raises(LimenexConfigError, match="already names another executor"):
        engine.governed("payments")(make_sender("mallory"))  # same qualname, another closure
    engine.governed("payments", name="send:treasury")(make_sender("treasury"))
    with pytest.raises(EscalationRequired) as paused:
        petty(500, agent_id="agent-1")
    request_id = paused.value.request_id
    assert request_id is not None
    engine.approvals.approve_sync(request_id, approver="ops")
    assert engine.resume_sync(request_id) == "petty-cash"
    assert sent == ["500 from petty-cash"]


async def test_a_new_request_that_cannot_be_kept_leaves_the_approval_unspent(
    make_engine: MakeEngine,
) -> None:
    from limenex.approvals import InMemoryApprovalStore

    class Flaky(InMemoryApprovalStore):
        down = False

        def create(self, request: ApprovalRequest) -> None:
            if self.down:
                raise ApprovalStoreError("approval database unreachable")
            super().create(request)

    store = Flaky()
    engine = make_engine(
        """
        finance.spend:
          policies:
            - {type: deterministic, dimension: amount_usd, param: amount_usd, operator: lte,
               value: 100, stateful: false, breach_verdict: ESCALATE}
            - {type: deterministic, dimension: approved_services, param: service,
               operator: in, values: [stripe], breach_verdict: ESCALATE}
        """,
        approval_store=store,
    )
    ledger = Ledger()
    first = await escalate_service(make_spend(engine, {"wire": ledger.pay}), "wire", 500)
    await engine.approvals.approve(first, approver="ops")
    store.down = True
    with pytest.raises(BlockedError, match="approval store"):
        await engine.resume(first)
    kept = await engine.approvals.get(first)
    assert kept is not None
    assert kept.status is ApprovalStatus.APPROVED  # nothing was carried, nothing was spent
    store.down = False
    with pytest.raises(EscalationRequired):
        await engine.resume(first)
    assert ledger.calls == []


async def test_two_registries_made_into_one_skill_need_their_own_names(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(ESCALATE_OVER_20_BLOCK_AT_100)
    tenant_a, tenant_b = Ledger(), Ledger()
    spend_a = make_spend(engine, {"stripe": tenant_a.pay})
    make_spend(engine, {"stripe": tenant_a.pay})  # the same registry again: fine
    with pytest.raises(LimenexConfigError, match="already names another executor"):
        make_spend(engine, {"stripe": tenant_b.pay})
    make_spend(engine, {"stripe": tenant_b.pay}, name="tenant-b")
    request_id = await escalate(spend_a, 30)
    await engine.approvals.approve(request_id, approver="ops")
    await engine.resume(request_id)
    assert (tenant_a.calls, tenant_b.calls) == ([30], [])
