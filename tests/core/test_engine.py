"""The governed call: ordered verdicts, reserve/execute/settle, bad input and fail-closed."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limenex.core.decision import Decision, Verdict
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import (
    GovernanceSignal,
    InvalidArgumentError,
    LimenexConfigError,
    LimenexError,
    StateStoreError,
    UnregisteredSkillError,
)
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import CounterKey, StateStore
from limenex.core.stores import InMemoryStateStore
from limenex.skills import UnregisteredExecutorError
from limenex.skills.finance import make_spend
from limenex.testing import FrozenClock, ScriptedEvaluator

MakeEngine = Callable[..., PolicyEngine]

SPEND_LT_50 = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 50
      breach_verdict: ESCALATE
"""


def spend_total(store: StateStore, agent: str = "agent-1", dimension: str = "spend_usd") -> Decimal:
    return dict(store.totals(0)).get(CounterKey(dimension, "agent", agent, ""), Decimal(0))


def recorded(store: StateStore) -> dict[CounterKey, Decimal]:
    """Every non-zero total (a released reservation may leave a zero behind)."""
    return {key: total for key, total in store.totals(0) if total}


class Ledger:
    """A fake payment provider that records what actually ran."""

    def __init__(self) -> None:
        self.paid: list[Any] = []
        self.lock = threading.Lock()

    async def pay(self, amount_usd: Any) -> str:
        with self.lock:
            self.paid.append(amount_usd)
        return f"paid {amount_usd}"


# --- the quickstart semantics ----------------------------------------------------------------


async def test_second_spend_over_cumulative_limit_escalates_and_is_not_recorded(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(SPEND_LT_50)
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})

    assert await spend(agent_id="agent-1", service="openai", amount_usd=30.0) == "paid 30.0"
    with pytest.raises(EscalationRequired) as caught:
        await spend(agent_id="agent-1", service="openai", amount_usd=30.0)

    assert ledger.paid == [30.0]
    assert spend_total(engine.state_store) == Decimal("30.0")
    decision = caught.value.decision
    assert decision.verdict is Verdict.ESCALATE
    assert decision.policy_index == 0
    assert (decision.observed, decision.projected, decision.limit) == (
        Decimal("30.0"),
        Decimal("60.0"),
        Decimal(50),
    )
    assert "spend_usd" in decision.reason
    assert "60.0" in decision.reason
    assert caught.value.result is decision


async def test_agents_have_separate_totals(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50)
    spend = make_spend(engine, {"openai": Ledger().pay})
    await spend(agent_id="a", service="openai", amount_usd=40)
    await spend(agent_id="b", service="openai", amount_usd=40)
    with pytest.raises(EscalationRequired):
        await spend(agent_id="a", service="openai", amount_usd=10)


# --- concurrency -------------------------------------------------------------------------------


async def test_hundred_concurrent_tasks_execute_exactly_four_ten_dollar_spends(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(SPEND_LT_50)
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})

    async def one() -> str:
        try:
            await spend(agent_id="agent-1", service="openai", amount_usd=10)
            return "ran"
        except EscalationRequired:
            return "escalated"

    outcomes = await asyncio.gather(*(one() for _ in range(100)))

    assert outcomes.count("ran") == 4
    assert len(ledger.paid) == 4
    assert spend_total(engine.state_store) == Decimal(40)


def test_forty_threads_through_sync_governed_function_execute_exactly_seven(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        """
        tools.ping:
          policies:
            - type: deterministic
              dimension: pings
              operator: lte
              value: 7
              breach_verdict: BLOCK
        """
    )
    ran: list[int] = []
    barrier = threading.Barrier(40)

    @engine.governed("tools.ping")
    def ping(agent_id: str, n: int) -> int:
        ran.append(n)
        return n

    results: list[str] = []

    def worker(n: int) -> None:
        barrier.wait()
        try:
            ping(agent_id="agent-1", n=n)
            results.append("ran")
        except BlockedError:
            results.append("blocked")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results.count("ran") == 7 == len(ran)
    assert results.count("blocked") == 33
    assert dict(engine.state_store.totals(0))[CounterKey("pings", "agent", "agent-1", "")] == 7


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    amounts=st.lists(
        st.decimals(min_value=0, max_value=60, places=2, allow_nan=False), min_size=1, max_size=60
    ),
    limit=st.integers(min_value=0, max_value=300),
    operator=st.sampled_from(["lt", "lte"]),
    failing=st.sets(st.integers(min_value=0, max_value=59)),
)
def test_concurrent_spends_never_overspend_and_total_equals_what_ran(
    amounts: list[Decimal], limit: int, operator: str, failing: set[int]
) -> None:
    """Property: under concurrent tasks, with some executors failing, the recorded total
    equals the sum of the spends that ran and the limit holds."""
    policies = InMemoryPolicyStore.from_yaml(
        SPEND_LT_50.replace("lt", operator).replace("50", str(limit))
    )
    engine = PolicyEngine(policy_store=policies, state_store=InMemoryStateStore())
    ran: list[Decimal] = []

    async def pay(amount_usd: Decimal) -> None:
        await asyncio.sleep(0)
        if amounts.index(amount_usd) in failing:
            raise RuntimeError("provider down")
        ran.append(amount_usd)

    spend = make_spend(engine, {"p": pay})

    async def one(amount: Decimal) -> None:
        with contextlib.suppress(EscalationRequired, RuntimeError):
            await spend(agent_id="agent-1", service="p", amount_usd=amount)

    async def run_all() -> None:
        await asyncio.gather(*(one(a) for a in amounts))

    asyncio.run(run_all())

    total = spend_total(engine.state_store)
    assert total == sum(ran, Decimal(0))
    if ran:
        assert total < limit if operator == "lt" else total <= limit


# --- executor failure -------------------------------------------------------------------------


async def test_executor_that_raises_leaves_budget_untouched_and_exception_unchanged(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(SPEND_LT_50)
    boom = ConnectionError("stripe is down")

    async def failing(amount_usd: float) -> None:
        raise boom

    ledger = Ledger()
    spend = make_spend(engine, {"broken": failing, "stripe": ledger.pay})
    with pytest.raises(ConnectionError) as caught:
        await spend(agent_id="agent-1", service="broken", amount_usd=45)

    assert caught.value is boom
    assert spend_total(engine.state_store) == 0
    await spend(agent_id="agent-1", service="stripe", amount_usd=45)
    assert ledger.paid == [45]


async def test_cancelled_executor_keeps_amount_counted(make_engine: MakeEngine) -> None:
    """We cannot know a cancelled action did not happen, so its amount stays spent."""
    engine = make_engine(SPEND_LT_50)
    started = asyncio.Event()

    async def slow(amount_usd: float) -> None:
        started.set()
        await asyncio.sleep(60)

    spend = make_spend(engine, {"slow": slow})
    task = asyncio.create_task(spend(agent_id="agent-1", service="slow", amount_usd=20))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert spend_total(engine.state_store) == 20


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "fragment"),
    [
        (-5, "must not be negative"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (-math.inf, "finite"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
        (True, "must be a number"),
        ("30", "must be a number"),
        (None, "must be a number"),
    ],
)
async def test_bad_amount_is_refused_naming_the_argument_and_nothing_runs(
    make_engine: MakeEngine, amount: Any, fragment: str
) -> None:
    engine = make_engine(SPEND_LT_50)
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})
    await spend(agent_id="agent-1", service="openai", amount_usd=5)

    with pytest.raises(InvalidArgumentError) as caught:
        await spend(agent_id="agent-1", service="openai", amount_usd=amount)

    assert caught.value.argument == "amount_usd"
    assert "amount_usd" in str(caught.value)
    assert fragment in str(caught.value)
    assert caught.value.decision is not None
    assert caught.value.decision.verdict is Verdict.BLOCK
    assert ledger.paid == [5]
    assert spend_total(engine.state_store) == 5


async def test_missing_amount_is_refused_naming_the_argument(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50)
    ran: list[object] = []

    @engine.governed("finance.spend")
    async def spend(agent_id: str, service: str, amount_usd: float) -> None:
        ran.append(amount_usd)

    with pytest.raises(InvalidArgumentError) as caught:
        await spend(agent_id="agent-1", service="openai")  # type: ignore[call-arg]
    assert caught.value.argument == "amount_usd"
    assert ran == []
    assert recorded(engine.state_store) == {}


@pytest.mark.parametrize("agent_id", ["", None, 7, b"agent-1"])
async def test_empty_or_non_string_agent_id_is_refused(
    make_engine: MakeEngine, agent_id: Any
) -> None:
    engine = make_engine(SPEND_LT_50)
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})
    with pytest.raises(InvalidArgumentError) as caught:
        await spend(agent_id=agent_id, service="openai", amount_usd=5)
    assert caught.value.argument == "agent_id"
    assert ledger.paid == []
    assert recorded(engine.state_store) == {}


async def test_hundred_ten_cent_spends_fit_lte_ten_exactly(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50.replace("operator: lt", "operator: lte").replace("50", "10"))
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})
    for _ in range(100):
        await spend(agent_id="agent-1", service="openai", amount_usd=0.10)
    with pytest.raises(EscalationRequired):
        await spend(agent_id="agent-1", service="openai", amount_usd=0.01)
    assert len(ledger.paid) == 100
    assert spend_total(engine.state_store) == Decimal("10.00")


async def test_unknown_service_is_refused_before_governance(make_engine: MakeEngine) -> None:
    evaluator = ScriptedEvaluator(["ALLOW"])
    engine = make_engine(
        SPEND_LT_50 + "    - type: semantic\n      rule: r\n      breach_verdict: BLOCK\n",
        llm_evaluator=evaluator,
    )
    spend = make_spend(engine, {"openai": Ledger().pay})
    with pytest.raises(UnregisteredExecutorError, match=r"'aws'.*registered: openai"):
        await spend(agent_id="agent-1", service="aws", amount_usd=5)
    assert evaluator.calls == []
    assert recorded(engine.state_store) == {}


async def test_skill_missing_from_policy_file_is_refused(make_engine: MakeEngine) -> None:
    engine = make_engine("comms.send:\n  policies: []\n")
    spend = make_spend(engine, {"openai": Ledger().pay})
    with pytest.raises(UnregisteredSkillError) as caught:
        await spend(agent_id="agent-1", service="openai", amount_usd=5)
    assert isinstance(caught.value, LimenexConfigError)
    assert caught.value.decision is not None
    assert caught.value.decision.verdict is Verdict.BLOCK


async def test_skill_with_empty_policy_list_is_allowed(make_engine: MakeEngine) -> None:
    engine = make_engine("finance.spend:\n  policies: []\n")
    ledger = Ledger()
    await make_spend(engine, {"x": ledger.pay})(agent_id="a", service="x", amount_usd=10**9)
    assert ledger.paid == [10**9]


# --- ordered evaluation ----------------------------------------------------------------------

ORDERED = """
finance.spend:
  policies:
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: 500
      stateful: false
      breach_verdict: BLOCK
    - type: deterministic
      dimension: approved_services
      param: service
      operator: in
      values: [openai, aws]
      breach_verdict: BLOCK
    - type: semantic
      rule: "Escalate if the purchase looks unrelated to the user's request."
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 50
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_calls
      operator: lte
      value: 3
      breach_verdict: BLOCK
"""


async def test_first_breached_policy_decides_and_later_model_is_not_asked(
    make_engine: MakeEngine,
) -> None:
    evaluator = ScriptedEvaluator(lambda intent, rule: "ALLOW")
    engine = make_engine(ORDERED, llm_evaluator=evaluator)
    spend = make_spend(engine, {"openai": Ledger().pay, "gcp": Ledger().pay})

    with pytest.raises(BlockedError) as caught:
        await spend(agent_id="a", service="openai", amount_usd=600)
    assert caught.value.decision.policy_index == 0
    with pytest.raises(BlockedError) as caught:
        await spend(agent_id="a", service="gcp", amount_usd=5)
    assert caught.value.decision.policy_index == 1
    assert "'gcp' is not in approved_services" in caught.value.decision.reason
    assert evaluator.calls == []

    await spend(agent_id="a", service="openai", amount_usd=5)
    assert len(evaluator.calls) == 1
    intent, rule = evaluator.calls[0]
    assert rule.startswith("Escalate if")
    assert intent.params["amount_usd"] == 5
    assert '"skill": "finance.spend"' in intent


async def test_semantic_breach_before_stateful_policy_wins_and_releases(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(ORDERED, llm_evaluator=ScriptedEvaluator(["ESCALATE"]))
    spend = make_spend(engine, {"openai": Ledger().pay})
    with pytest.raises(EscalationRequired) as caught:
        await spend(agent_id="a", service="openai", amount_usd=10)
    assert caught.value.decision.policy_index == 2
    assert recorded(engine.state_store) == {}


async def test_counter_blocks_after_its_limit(make_engine: MakeEngine) -> None:
    engine = make_engine(ORDERED, llm_evaluator=lambda intent, rule: "ALLOW")
    spend = make_spend(engine, {"openai": Ledger().pay})
    for _ in range(3):
        await spend(agent_id="a", service="openai", amount_usd=1)
    with pytest.raises(BlockedError) as caught:
        await spend(agent_id="a", service="openai", amount_usd=1)
    assert caught.value.decision.policy_index == 4
    assert "4 calls" in caught.value.decision.reason
    assert spend_total(engine.state_store, "a") == 3


async def test_one_call_adds_its_amount_once_per_dimension(make_engine: MakeEngine) -> None:
    engine = make_engine(
        SPEND_LT_50
        + """    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 45
      breach_verdict: BLOCK
"""
    )
    spend = make_spend(engine, {"openai": Ledger().pay})
    await spend(agent_id="a", service="openai", amount_usd=20)
    await spend(agent_id="a", service="openai", amount_usd=20)
    assert spend_total(engine.state_store, "a") == 40
    with pytest.raises(BlockedError):
        await spend(agent_id="a", service="openai", amount_usd=6)


# --- semantic evaluators fail closed ---------------------------------------------------------

SEMANTIC = """
comms.send:
  policies:
    - type: semantic
      rule: "Escalate if the tone is aggressive."
      verdict_ceiling: ESCALATE
"""


async def _hang(intent: str, rule: str) -> str:
    await asyncio.sleep(30)
    return "ALLOW"


def _raise(intent: str, rule: str) -> str:
    raise RuntimeError("model exploded")


@pytest.mark.parametrize(
    ("evaluator", "fragment"),
    [
        (_raise, "RuntimeError: model exploded"),
        (_hang, "did not answer within 0.2 s"),
        (lambda i, r: "Sure! ALLOW", "is not ALLOW, BLOCK or ESCALATE"),
        (lambda i, r: {"verdict": "ALLOW", "extra": 1}, "unexpected keys"),
        (lambda i, r: None, "is not ALLOW"),
        (None, "no llm_evaluator is configured"),
    ],
)
async def test_failing_evaluator_resolves_to_the_breach_verdict(
    make_engine: MakeEngine, evaluator: Any, fragment: str
) -> None:
    engine = make_engine(SEMANTIC, llm_evaluator=evaluator, semantic_timeout=0.2)
    sent: list[str] = []

    async def deliver(recipient: str, text: str) -> None:
        sent.append(text)

    from limenex.skills.comms import make_send

    send = make_send(engine, {"email": deliver})
    with pytest.raises(EscalationRequired) as caught:
        await send(agent_id="a", channel="email", recipient="bob@example.com", text="hi")
    assert fragment in caught.value.decision.reason
    assert sent == []


@pytest.mark.parametrize("answer", ["ALLOW", " allow\n", Verdict.ALLOW, {"verdict": "ALLOW"}])
async def test_evaluator_allow_answers_are_accepted(make_engine: MakeEngine, answer: Any) -> None:
    async def evaluator(intent: str, rule: str) -> Any:
        return answer

    engine = make_engine(SEMANTIC, llm_evaluator=evaluator)
    decision = await engine.evaluate("comms.send", "a", {"recipient": "b", "text": "t"})
    assert decision.verdict is Verdict.ALLOW


def test_sync_governed_call_with_async_evaluator_works_inside_running_loop(
    make_engine: MakeEngine,
) -> None:
    async def evaluator(intent: str, rule: str) -> dict[str, str]:
        return {"verdict": "BLOCK", "reason": "aggressive tone"}

    engine = make_engine(SEMANTIC.replace("comms.send", "tools.shout"), llm_evaluator=evaluator)

    @engine.governed("tools.shout")
    def shout(agent_id: str, text: str) -> str:
        return text.upper()

    async def inside_loop() -> Decision:
        with pytest.raises(EscalationRequired) as caught:
            shout(agent_id="a", text="hey")
        return caught.value.decision

    decision = asyncio.run(inside_loop())
    assert "aggressive tone" in decision.reason


# --- dry run -------------------------------------------------------------------------------------


async def test_evaluate_is_a_dry_run(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50)
    ledger = Ledger()
    await make_spend(engine, {"openai": ledger.pay})(agent_id="a", service="openai", amount_usd=30)
    before = engine.state_store.totals(0)

    allow = await engine.evaluate("finance.spend", "a", {"service": "openai", "amount_usd": 19})
    escalate = engine.evaluate_sync("finance.spend", "a", {"service": "openai", "amount_usd": 20})

    assert allow.verdict is Verdict.ALLOW
    assert escalate.verdict is Verdict.ESCALATE
    assert escalate.projected == 50
    assert engine.state_store.totals(0) == before
    assert ledger.paid == [30]


# --- fail closed ---------------------------------------------------------------------------------


class BrokenStore(InMemoryStateStore):
    def reserve(self, checks: Any, now: float) -> Any:
        raise StateStoreError("connection refused")

    def peek(self, checks: Any, now: float) -> Any:
        raise StateStoreError("connection refused")


async def test_store_failure_blocks_and_runs_nothing() -> None:
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(SPEND_LT_50), state_store=BrokenStore()
    )
    ledger = Ledger()
    with pytest.raises(BlockedError) as caught:
        await make_spend(engine, {"openai": ledger.pay})(
            agent_id="a", service="openai", amount_usd=1
        )
    assert caught.value.decision.fail_closed
    assert isinstance(caught.value.__cause__, StateStoreError)
    assert "state store failed" in caught.value.decision.reason
    assert ledger.paid == []
    dry = await engine.evaluate("finance.spend", "a", {"service": "openai", "amount_usd": 1})
    assert dry.verdict is Verdict.BLOCK
    assert dry.fail_closed


async def test_audit_sink_failure_blocks_the_action(make_engine: MakeEngine) -> None:
    def sink(event: str, decision: Decision, params: Any) -> None:
        raise OSError("disk full")

    engine = make_engine(SPEND_LT_50, audit_logger=sink)
    ledger = Ledger()
    with pytest.raises(BlockedError) as caught:
        await make_spend(engine, {"openai": ledger.pay})(
            agent_id="a", service="openai", amount_usd=1
        )
    assert caught.value.decision.fail_closed
    assert "audit sink" in caught.value.decision.reason
    assert ledger.paid == []
    assert recorded(engine.state_store) == {}


async def test_audit_hook_sees_every_decision_and_outcome(make_engine: MakeEngine) -> None:
    events: list[tuple[str, Verdict]] = []
    engine = make_engine(
        SPEND_LT_50, audit_logger=lambda event, d, params: events.append((event, d.verdict))
    )
    spend = make_spend(engine, {"openai": Ledger().pay})
    await spend(agent_id="a", service="openai", amount_usd=30)
    with pytest.raises(EscalationRequired):
        await spend(agent_id="a", service="openai", amount_usd=30)
    assert events == [
        ("allowed", Verdict.ALLOW),
        ("executed", Verdict.ALLOW),
        ("escalated", Verdict.ESCALATE),
    ]


# --- vocabulary ----------------------------------------------------------------------------------


def test_decision_is_immutable() -> None:
    decision = Decision(Verdict.ALLOW, "s", "a", "ok")
    with pytest.raises(AttributeError):
        decision.verdict = Verdict.BLOCK  # type: ignore[misc]
    assert decision.to_dict()["verdict"] == "ALLOW"


def test_exception_tree_has_one_root_and_three_kinds() -> None:
    decision = Decision(Verdict.BLOCK, "s", "a", "no")
    assert issubclass(BlockedError, GovernanceSignal)
    assert issubclass(EscalationRequired, GovernanceSignal)
    assert issubclass(GovernanceSignal, LimenexError)
    assert issubclass(LimenexConfigError, LimenexError)
    assert issubclass(StateStoreError, LimenexError)
    assert not issubclass(StateStoreError, GovernanceSignal)
    assert BlockedError(decision).result is decision


def test_governed_requires_the_agent_id_parameter(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50)
    with pytest.raises(LimenexConfigError, match="no parameter 'agent_id'"):

        @engine.governed("finance.spend")
        def spend(service: str, amount_usd: float) -> None: ...


def test_governed_refuses_a_function_missing_a_policy_param(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50)
    with pytest.raises(LimenexConfigError, match="'amount_usd'"):

        @engine.governed("finance.spend")
        def spend(agent_id: str, service: str, amount: float) -> None: ...


def test_governed_reads_agent_id_from_a_named_parameter(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50.replace("finance.spend", "billing.pay"))

    @engine.governed("billing.pay", agent_id_param="user")
    def pay(user: str, amount_usd: float = 30.0) -> float:
        return amount_usd

    assert pay("u1") == 30.0
    with pytest.raises(EscalationRequired):
        pay("u1")
    assert pay("u2") == 30.0


async def test_clock_drives_rolling_windows(make_engine: MakeEngine, clock: FrozenClock) -> None:
    engine = make_engine(
        SPEND_LT_50.replace("      breach_verdict", "      window: 1h\n      breach_verdict")
    )
    spend = make_spend(engine, {"openai": Ledger().pay})
    await spend(agent_id="a", service="openai", amount_usd=40)
    clock.advance(3599)
    with pytest.raises(EscalationRequired):
        await spend(agent_id="a", service="openai", amount_usd=10)
    clock.advance(1)
    await spend(agent_id="a", service="openai", amount_usd=49)


async def test_scoped_limits_count_per_recipient(make_engine: MakeEngine) -> None:
    from limenex.skills.comms import make_send

    engine = make_engine(
        """
        comms.send:
          policies:
            - type: deterministic
              dimension: emails
              operator: lte
              value: 2
              scope: [agent, recipient]
              breach_verdict: BLOCK
            - type: deterministic
              dimension: all_emails
              operator: lte
              value: 3
              scope: global
              breach_verdict: ESCALATE
        """
    )

    async def deliver(recipient: str, text: str) -> None:
        return None

    send = make_send(engine, {"email": deliver})
    await send(agent_id="a", channel="email", recipient="x", text="1")
    await send(agent_id="a", channel="email", recipient="x", text="2")
    with pytest.raises(BlockedError):
        await send(agent_id="a", channel="email", recipient="x", text="3")
    await send(agent_id="b", channel="email", recipient="x", text="4")
    with pytest.raises(EscalationRequired):
        await send(agent_id="c", channel="email", recipient="y", text="5")


def test_engine_refuses_objects_that_are_not_stores() -> None:
    with pytest.raises(LimenexConfigError, match="policy_store must be"):
        PolicyEngine(policy_store=object())  # type: ignore[arg-type]
    with pytest.raises(LimenexConfigError, match="state_store must be"):
        PolicyEngine(
            policy_store=InMemoryPolicyStore.from_yaml(SPEND_LT_50),
            state_store=object(),  # type: ignore[arg-type]
        )


def test_governed_binds_positional_keyword_and_default_arguments_alike(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        """
        billing.pay:
          policies:
            - type: deterministic
              dimension: spend_usd
              param: amount_usd
              operator: lte
              value: 10
              breach_verdict: BLOCK
        """
    )

    @engine.governed("billing.pay")
    def pay(agent_id: str, amount_usd: float = 4, *, memo: str = "") -> float:
        return amount_usd

    assert pay("a") == 4  # default applied and counted
    assert pay("a", 3) == 3  # positional
    assert pay(agent_id="a", amount_usd=3, memo="m") == 3  # keyword fast path
    with pytest.raises(BlockedError):
        pay(amount_usd=1, agent_id="a")
    with pytest.raises(InvalidArgumentError) as caught:
        pay(agent_id="a", amount=1)  # type: ignore[call-arg]
    assert "amount" in str(caught.value)
    assert spend_total(engine.state_store, "a") == 10


# --- found in review: each of these once let something through ---------------------------


class SneakyFloat(float):
    def __float__(self) -> float:
        return 1.0


class SneakyInt(int):
    def __int__(self) -> int:
        return 1


class SneakyDecimal(Decimal):
    def __lt__(self, other: object) -> bool:
        return False


@pytest.mark.parametrize(
    "amount", [SneakyFloat(1000), SneakyInt(1000), SneakyDecimal(-1000)], ids=type
)
async def test_number_subclasses_are_refused_so_the_checked_value_is_the_spent_value(
    make_engine: MakeEngine, amount: Any
) -> None:
    engine = make_engine(SPEND_LT_50)
    ledger = Ledger()
    with pytest.raises(InvalidArgumentError, match="subclass") as caught:
        await make_spend(engine, {"o": ledger.pay})(agent_id="a", service="o", amount_usd=amount)
    assert caught.value.argument == "amount_usd"
    assert ledger.paid == []
    assert recorded(engine.state_store) == {}


@pytest.mark.parametrize(
    ("amount", "fragment"),
    [
        (1e300, "too large"),
        (10**400, "too large"),
        (Decimal("1E+30"), "too large"),
        (5e-324, "decimal places"),
        (Decimal("1E-19"), "decimal places"),
        (Decimal("0.1000000000000000001"), "decimal places"),
    ],
)
async def test_amounts_that_could_poison_an_exact_total_are_refused(
    make_engine: MakeEngine, amount: Any, fragment: str
) -> None:
    engine = make_engine(SPEND_LT_50)
    with pytest.raises(InvalidArgumentError, match=fragment):
        await make_spend(engine, {"o": Ledger().pay})(agent_id="a", service="o", amount_usd=amount)
    assert recorded(engine.state_store) == {}


async def test_trailing_zeros_and_large_budgets_are_fine(make_engine: MakeEngine) -> None:
    engine = make_engine(SPEND_LT_50.replace("value: 50", "value: 100000000000000000000000000000"))
    ledger = Ledger()
    spend = make_spend(engine, {"o": ledger.pay})
    await spend(agent_id="a", service="o", amount_usd=Decimal("1.000000000000000000000000"))
    await spend(agent_id="a", service="o", amount_usd=10**28)
    assert spend_total(engine.state_store, "a") == 10**28 + 1


STATEFUL_BLOCK_THEN_STATELESS_ESCALATE = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 100
      breach_verdict: BLOCK
    - type: semantic
      rule: "Escalate anything odd."
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: 50
      stateful: false
      breach_verdict: ESCALATE
"""


async def test_earlier_stateful_breach_wins_over_later_stateless_breach(
    make_engine: MakeEngine,
) -> None:
    """A hard BLOCK must not turn into an ESCALATE a human could approve."""
    evaluator = ScriptedEvaluator(lambda intent, rule: "ALLOW")
    engine = make_engine(STATEFUL_BLOCK_THEN_STATELESS_ESCALATE, llm_evaluator=evaluator)
    spend = make_spend(engine, {"o": Ledger().pay})
    await spend(agent_id="a", service="o", amount_usd=50)
    await spend(agent_id="a", service="o", amount_usd=50)
    asked = len(evaluator.calls)

    with pytest.raises(BlockedError) as caught:
        await spend(agent_id="a", service="o", amount_usd=60)
    dry = await engine.evaluate("finance.spend", "a", {"service": "o", "amount_usd": 60})

    @engine.governed("finance.spend")
    def spend_sync(agent_id: str, service: str, amount_usd: float) -> None: ...

    with pytest.raises(BlockedError) as caught_sync:
        spend_sync(agent_id="a", service="o", amount_usd=60)
    assert caught.value.decision.policy_index == 0
    assert caught_sync.value.decision.policy_index == 0
    assert dry.verdict is Verdict.BLOCK
    assert dry.policy_index == 0
    assert len(evaluator.calls) == asked  # policy 1 decided: the model was never asked
    assert spend_total(engine.state_store, "a") == 100


async def test_later_stateless_breach_decides_when_earlier_stateful_policy_holds(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(
        STATEFUL_BLOCK_THEN_STATELESS_ESCALATE, llm_evaluator=lambda intent, rule: "ALLOW"
    )
    with pytest.raises(EscalationRequired) as caught:
        await make_spend(engine, {"o": Ledger().pay})(agent_id="a", service="o", amount_usd=60)
    assert caught.value.decision.policy_index == 2
    assert recorded(engine.state_store) == {}


async def test_total_that_cannot_stay_exact_blocks_both_dry_run_and_call(
    make_engine: MakeEngine, clock: FrozenClock
) -> None:
    engine = make_engine(SPEND_LT_50.replace("value: 50", "value: 100000000000000000000000000000"))
    key = CounterKey("spend_usd", "agent", "a", "")
    engine.state_store.adjust(key, Decimal("1E+95"), clock.now())  # an operator's mistake
    dry = await engine.evaluate("finance.spend", "a", {"service": "o", "amount_usd": 0.5})
    assert dry.verdict is Verdict.BLOCK
    assert dry.fail_closed
    ledger = Ledger()
    with pytest.raises(BlockedError):
        await make_spend(engine, {"o": ledger.pay})(agent_id="a", service="o", amount_usd=0.5)
    assert ledger.paid == []


class AsyncCallable:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, agent_id: str, amount_usd: float) -> None:
        self.calls += 1
        raise RuntimeError("provider down")


async def test_async_callable_object_is_governed_as_async_and_released_on_failure(
    make_engine: MakeEngine,
) -> None:
    engine = make_engine(SPEND_LT_50.replace("finance.spend", "billing.pay"))
    pay = engine.governed("billing.pay")(AsyncCallable())
    for _ in range(2):
        with pytest.raises(RuntimeError, match="provider down"):
            await pay(agent_id="a", amount_usd=30)
    assert recorded(engine.state_store) == {}


def test_sync_path_refuses_an_executor_that_returns_a_coroutine(make_engine: MakeEngine) -> None:
    from limenex.skills.filesystem import make_write

    ran: list[str] = []

    async def remote_write(*, filepath: str, content: str) -> None:
        ran.append(filepath)

    engine = make_engine(
        """
        filesystem.write:
          policies:
            - type: deterministic
              dimension: writes
              operator: lte
              value: 1
              breach_verdict: BLOCK
        """
    )
    write = make_write(engine, executor=remote_write)
    with pytest.raises(LimenexConfigError, match="awaitable"):
        write(agent_id="a", filepath="/tmp/x", content="y")
    assert ran == []
    assert recorded(engine.state_store) == {}


async def test_evaluator_that_swallows_its_timeout_still_breaches(make_engine: MakeEngine) -> None:
    async def stubborn(intent: str, rule: str) -> str:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            return "ALLOW"
        return "ALLOW"

    engine = make_engine(SEMANTIC, llm_evaluator=stubborn, semantic_timeout=0.05)
    decision = await engine.evaluate("comms.send", "a", {"recipient": "b", "text": "t"})
    assert decision.verdict is Verdict.ESCALATE
    assert "did not answer within" in decision.reason


def test_broken_evaluator_loop_blocks_the_sync_path(
    make_engine: MakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(SEMANTIC.replace("comms.send", "tools.shout"), llm_evaluator=_raise)

    def broken() -> Any:
        raise RuntimeError("cannot start thread")

    monkeypatch.setattr(engine, "_background_loop", broken)
    ran: list[str] = []

    @engine.governed("tools.shout")
    def shout(agent_id: str, text: str) -> None:
        ran.append(text)

    with pytest.raises(BlockedError) as caught:
        shout(agent_id="a", text="hey")
    assert caught.value.decision.fail_closed
    assert "semantic evaluation failed" in caught.value.decision.reason
    assert ran == []


# --- stores whose async reserve suspends (network stores) or not (SQLite, uncontended) -------


class SuspendingStore(InMemoryStateStore):
    """``areserve`` suspends twice (a bare yield, then a future) before it reserves."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.fail = fail
        self.made: list[object] = []

    async def areserve(self, checks: Any, now: float) -> Any:
        self.entered.set()
        await asyncio.sleep(0)
        await self.gate.wait()
        if self.fail:
            raise StateStoreError("the server went away")
        outcome = self.reserve(checks, now)
        self.made.append(outcome)
        return outcome


class EagerStore(InMemoryStateStore):
    """``areserve`` that never suspends, as SQLite's is when its lock is free."""

    async def areserve(self, checks: Any, now: float) -> Any:
        return self.reserve(checks, now)


@pytest.mark.parametrize("kind", [SuspendingStore, EagerStore])
async def test_a_store_reserve_that_suspends_or_not_is_driven_to_its_result(kind: type) -> None:
    store = kind()
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(SPEND_LT_50), state_store=store
    )
    if isinstance(store, SuspendingStore):
        store.gate.set()
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})
    await spend(agent_id="agent-1", service="openai", amount_usd=30)
    with pytest.raises(EscalationRequired):
        await spend(agent_id="agent-1", service="openai", amount_usd=30)
    assert ledger.paid == [30]
    assert spend_total(store) == 30


async def test_a_store_failing_after_it_suspended_blocks_and_runs_nothing() -> None:
    store = SuspendingStore(fail=True)
    store.gate.set()
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(SPEND_LT_50), state_store=store
    )
    ledger = Ledger()
    with pytest.raises(BlockedError) as caught:
        await make_spend(engine, {"openai": ledger.pay})(
            agent_id="agent-1", service="openai", amount_usd=1
        )
    assert caught.value.decision.fail_closed
    assert isinstance(caught.value.__cause__, StateStoreError)
    assert ledger.paid == []


async def test_a_call_cancelled_while_its_store_reserves_releases_what_lands_later() -> None:
    """The reservation lands after the caller is gone: nothing ran, so it is released."""
    store = SuspendingStore()
    engine = PolicyEngine(
        policy_store=InMemoryPolicyStore.from_yaml(SPEND_LT_50), state_store=store
    )
    ledger = Ledger()
    spend = make_spend(engine, {"openai": ledger.pay})
    call = asyncio.ensure_future(spend(agent_id="agent-1", service="openai", amount_usd=30))
    await store.entered.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    store.gate.set()  # the store now makes the reservation nobody is waiting for
    for _ in range(10):
        await asyncio.sleep(0)
    assert len(store.made) == 1  # it did land...
    assert spend_total(store) == 0  # ...and was released
    assert store.pending(0.0) == []
    assert ledger.paid == []


def test_a_nul_byte_in_a_path_param_is_refused_naming_it() -> None:
    """Found by review: it was a fail-closed BLOCK ("policy evaluation failed") instead of
    the input refusal that names the argument."""
    from limenex.core.errors import InvalidArgumentError
    from limenex.core.policy_store import InMemoryPolicyStore

    engine = PolicyEngine(
        InMemoryPolicyStore.from_yaml(
            "files.read:\n  policies:\n"
            "    - {type: deterministic, dimension: protected, param: path, operator: not_in,"
            " values: [/etc], match: path, breach_verdict: BLOCK}\n"
        ),
        "memory://",
        audit_logger=False,
    )
    for call in (engine.evaluate_sync, lambda *a: engine.execute_sync(*a, lambda: None)):
        with pytest.raises(InvalidArgumentError) as refused:
            call("files.read", "a", {"path": "/tmp/a\0b"})
        assert refused.value.argument == "path"
        assert not refused.value.decision.fail_closed
    engine.close()
