"""OpenTelemetry: a span per governed call and metrics of verdicts and latency (SDK on).

``sync`` runs a call through a synchronous ``@engine.governed`` function, otherwise through
an async ``make_spend`` skill.

The API lets a process set its global providers once, which would leave the SDK on for
every later test of the run. So the ``otel`` fixture puts a fresh SDK provider (in-memory
exporter and reader) in the API's globals, the ones ``set_tracer_provider`` writes and
:func:`limenex.telemetry.enabled` reads, and monkeypatch takes it away afterwards. The
subprocess tests at the end use the public ``set_*_provider`` calls in a fresh process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.metrics import _internal as metrics_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import limenex.telemetry
from limenex.approvals import ApprovalRefused
from limenex.core.decision import Verdict
from limenex.core.engine import BlockedError, EscalationRequired, PolicyEngine
from limenex.core.errors import InvalidArgumentError, StateStoreError, UnregisteredSkillError
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.state import Check, Reservation, StateBreach
from limenex.core.stores import InMemoryStateStore
from limenex.skills.finance import make_spend
from limenex.telemetry import note_shadow

POLICY = """
finance.spend:
  policies:
    - type: deterministic
      dimension: approved_services
      param: service
      operator: in
      values: [openai]
      breach_verdict: BLOCK
    - type: deterministic
      dimension: single_spend_usd
      param: amount_usd
      operator: lte
      value: 100
      stateful: false
      breach_verdict: ESCALATE
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lt
      value: 1000
      breach_verdict: BLOCK
comms.send:
  policies:
    - type: deterministic
      dimension: known_recipients
      param: recipient
      operator: in
      values: [ana@example.com]
      breach_verdict: BLOCK
"""


@dataclass
class Otel:
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider

    def spans(self) -> list[ReadableSpan]:
        """The finished spans of Limenex's tracer, oldest first."""
        return [
            span
            for span in self.exporter.get_finished_spans()
            if span.instrumentation_scope is not None
            and span.instrumentation_scope.name == "limenex"
        ]

    def span(self) -> ReadableSpan:
        """The one Limenex span of the test."""
        spans = self.spans()
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]

    def points(self, name: str) -> list[Any]:
        """The data points of metric ``name`` collected so far."""
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[Otel]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider(shutdown_on_exit=False)
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", tracer_provider)
    monkeypatch.setattr(metrics_api, "_METER_PROVIDER", meter_provider)
    monkeypatch.setattr(limenex.telemetry, "_instruments", None)  # made anew on these
    yield Otel(exporter, reader, tracer_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


SYNC = [pytest.param(False, id="async"), pytest.param(True, id="sync")]


class DownStore(InMemoryStateStore):
    """A state store whose reservations fail: every stateful call must BLOCK."""

    def reserve(self, checks: Sequence[Check], now: float) -> Reservation | StateBreach:
        raise StateStoreError("the store is down")


class Spend:
    """``finance.spend`` governed twice on one engine: async (factory) and sync (decorator)."""

    def __init__(self, executor: Callable[..., Any], state_store: Any = None) -> None:
        self.engine = PolicyEngine(
            InMemoryPolicyStore.from_yaml(POLICY),
            state_store or InMemoryStateStore(),
            audit_logger=False,
        )
        self.spend = make_spend(self.engine, {"openai": executor, "gcp": executor})

        @self.engine.governed("finance.spend")
        def spend_sync(agent_id: str, service: str, amount_usd: Any) -> Any:
            return executor(amount_usd=amount_usd)

        self.spend_sync = spend_sync

    async def __call__(
        self, sync: bool, amount_usd: Any = 10, service: str = "openai", agent_id: str = "bot-1"
    ) -> Any:
        if sync:
            return self.spend_sync(agent_id=agent_id, service=service, amount_usd=amount_usd)
        return await self.spend(agent_id=agent_id, service=service, amount_usd=amount_usd)

    def close(self) -> None:
        self.engine.close()


@pytest.fixture
def make_spend_skill() -> Any:
    made: list[Spend] = []

    def make(executor: Callable[..., Any] = lambda amount_usd: "paid", **kw: Any) -> Spend:
        skill = Spend(executor, **kw)
        made.append(skill)
        return skill

    yield make
    for skill in made:
        skill.close()


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


SECRET = "sk-live-4242SECRET"  # noqa: S105 - a fake secret to look for


def assert_no_secret(spans: Sequence[ReadableSpan], secret: str = SECRET) -> None:
    """``secret`` is in no span's name, attribute, event or status description."""
    assert spans
    for span in spans:
        values = [span.name, str(span.status.description)]
        values += [str(v) for v in attrs(span).values()]
        for event in span.events:
            values += [event.name, *(str(v) for v in (event.attributes or {}).values())]
        assert not [v for v in values if secret in v], span.name


# --- spans ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sync", SYNC)
async def test_allowed_call_yields_a_span_with_skill_agent_verdict_and_outcome(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    spend = make_spend_skill()
    assert await spend(sync) == "paid"
    span = otel.span()
    assert span.name == "limenex finance.spend"
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    got = attrs(span)
    assert got["limenex.skill"] == "finance.spend"
    assert got["limenex.agent"] == "bot-1"
    assert got["limenex.verdict"] == "ALLOW"
    assert got["limenex.outcome"] == "executed"
    assert 0 <= got["limenex.decision.duration"] < 5
    assert "limenex.policy.index" not in got
    assert "limenex.dry_run" not in got
    assert "limenex.resumed" not in got


@pytest.mark.parametrize("sync", SYNC)
async def test_block_by_a_policy_names_the_policy_and_is_not_an_error(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    spend = make_spend_skill()
    with pytest.raises(BlockedError):
        await spend(sync, service="gcp")
    got = attrs(otel.span())
    assert got["limenex.verdict"] == "BLOCK"
    assert got["limenex.policy.index"] == 1  # 1-based, as in the reason's "policy 1"
    assert got["limenex.policy.type"] == "deterministic"
    assert got["limenex.policy.dimension"] == "approved_services"
    assert "limenex.outcome" not in got
    assert "limenex.fail_closed" not in got
    assert otel.span().status.status_code is StatusCode.UNSET
    assert not otel.span().events  # a refusal is no exception to record


@pytest.mark.parametrize("sync", SYNC)
async def test_escalate_span_carries_the_approval_request_id(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    spend = make_spend_skill()
    with pytest.raises(EscalationRequired) as paused:
        await spend(sync, amount_usd=500)
    got = attrs(otel.span())
    assert got["limenex.verdict"] == "ESCALATE"
    assert got["limenex.request_id"] == paused.value.request_id
    assert got["limenex.policy.index"] == 2
    assert got["limenex.policy.dimension"] == "single_spend_usd"


@pytest.mark.parametrize("sync", SYNC)
async def test_executor_error_propagates_unchanged_and_marks_the_span(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    boom = ConnectionError(f"provider unreachable with key {SECRET}")

    def failing(amount_usd: Any) -> None:
        raise boom

    spend = make_spend_skill(failing)
    with pytest.raises(ConnectionError) as raised:
        await spend(sync)
    assert raised.value is boom  # the caller gets it whole, message and traceback
    span = otel.span()
    got = attrs(span)
    assert got["limenex.verdict"] == "ALLOW"  # the engine allowed it; the executor failed
    assert got["limenex.outcome"] == "failed"
    assert got["error.type"] == "ConnectionError"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ConnectionError"
    assert [event.name for event in span.events] == ["exception"]
    assert dict(span.events[0].attributes or {}) == {"exception.type": "ConnectionError"}
    assert_no_secret(otel.spans())


def test_interrupted_executor_is_an_allowed_call_interrupted(
    otel: Otel, make_spend_skill: Any
) -> None:
    def interrupted(amount_usd: Any) -> None:
        raise KeyboardInterrupt

    spend = make_spend_skill(interrupted)
    with pytest.raises(KeyboardInterrupt):
        spend.spend_sync(agent_id="bot-1", service="openai", amount_usd=1)
    got = attrs(otel.span())
    assert got["limenex.verdict"] == "ALLOW"
    assert got["limenex.outcome"] == "interrupted"


@pytest.mark.parametrize("sync", SYNC)
async def test_invalid_argument_is_a_block_with_an_error_status(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    spend = make_spend_skill()
    with pytest.raises(InvalidArgumentError):
        await spend(sync, amount_usd=float("nan"))
    span = otel.span()
    got = attrs(span)
    assert got["limenex.verdict"] == "BLOCK"
    assert got["error.type"] == "InvalidArgumentError"
    assert span.status.status_code is StatusCode.ERROR
    assert not span.events  # the message may quote the argument: it stays off the span


async def test_unregistered_skill_is_a_block(otel: Otel, make_spend_skill: Any) -> None:
    engine = make_spend_skill().engine
    with pytest.raises(UnregisteredSkillError):
        await engine.execute("finance.unknown", "bot-1", {}, lambda: None)
    with pytest.raises(UnregisteredSkillError):
        engine.execute_sync("finance.unknown", "bot-1", {}, lambda: None)
    spans = otel.spans()
    assert [s.name for s in spans] == ["limenex finance.unknown"] * 2
    for span in spans:
        assert attrs(span)["limenex.verdict"] == "BLOCK"
        assert attrs(span)["error.type"] == "UnregisteredSkillError"


@pytest.mark.parametrize("sync", SYNC)
async def test_fail_closed_block_is_marked_with_the_failure_type(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    ran: list[Any] = []
    spend = make_spend_skill(ran.append, state_store=DownStore())
    with pytest.raises(BlockedError) as blocked:
        await spend(sync)
    assert blocked.value.decision.fail_closed
    assert ran == []
    span = otel.span()
    got = attrs(span)
    assert got["limenex.verdict"] == "BLOCK"
    assert got["limenex.fail_closed"] is True
    assert got["error.type"] == "StateStoreError"
    assert "limenex.policy.index" not in got
    assert span.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize("sync", SYNC)
async def test_evaluate_is_a_dry_run_span(otel: Otel, make_spend_skill: Any, sync: bool) -> None:
    engine = make_spend_skill().engine
    params = {"service": "openai", "amount_usd": 500}
    if sync:
        decision = engine.evaluate_sync("finance.spend", "bot-1", params)
    else:
        decision = await engine.evaluate("finance.spend", "bot-1", params)
    assert decision.verdict is Verdict.ESCALATE
    got = attrs(otel.span())
    assert got["limenex.dry_run"] is True
    assert got["limenex.verdict"] == "ESCALATE"
    assert got["limenex.policy.index"] == 2
    assert "limenex.request_id" not in got  # a dry run keeps no request
    assert "limenex.outcome" not in got


@pytest.mark.parametrize("sync", SYNC)
async def test_evaluate_with_the_store_down_is_a_fail_closed_dry_run(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    class PeekDown(InMemoryStateStore):
        def peek(self, checks: Sequence[Check], now: float) -> Any:
            raise StateStoreError("down")

    engine = make_spend_skill(state_store=PeekDown()).engine
    params = {"service": "openai", "amount_usd": 1}
    if sync:
        decision = engine.evaluate_sync("finance.spend", "bot-1", params)
    else:
        decision = await engine.evaluate("finance.spend", "bot-1", params)
    assert decision.fail_closed
    span = otel.span()
    got = attrs(span)
    assert got["limenex.verdict"] == "BLOCK"
    assert got["limenex.fail_closed"] is True
    assert got["limenex.dry_run"] is True
    # the decision is returned, not raised: the failure's class is only in its reason
    assert got["error.type"] == "_OTHER"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "_OTHER"
    assert not span.events


@pytest.mark.parametrize("sync", SYNC)
async def test_resume_span_is_marked_resumed(otel: Otel, make_spend_skill: Any, sync: bool) -> None:
    spend = make_spend_skill()
    engine = spend.engine
    with pytest.raises(EscalationRequired) as paused:
        await spend(sync, amount_usd=500)
    request_id = paused.value.request_id
    await engine.approvals.approve(request_id, approver="ops")
    otel.exporter.clear()
    if sync:
        result = engine.resume_sync(request_id)
    else:
        result = await engine.resume(request_id)
    assert result == "paid"
    got = attrs(otel.span())
    assert got["limenex.resumed"] is True
    assert got["limenex.verdict"] == "ALLOW"
    assert got["limenex.outcome"] == "executed"


async def test_refused_resume_is_an_error_without_a_verdict(
    otel: Otel, make_spend_skill: Any
) -> None:
    spend = make_spend_skill()
    with pytest.raises(EscalationRequired) as paused:
        await spend(False, amount_usd=500)
    request_id = paused.value.request_id
    await spend.engine.approvals.approve(request_id, approver="ops")
    await spend.engine.resume(request_id)
    otel.exporter.clear()
    with pytest.raises(ApprovalRefused):
        await spend.engine.resume(request_id)  # used already: refused before the engine runs
    assert otel.spans() == []  # refused before a governed call began: no span


@pytest.mark.parametrize("sync", SYNC)
async def test_executor_spans_nest_under_the_governed_span(
    otel: Otel, make_spend_skill: Any, sync: bool
) -> None:
    tracer = otel.tracer_provider.get_tracer("payments-client")

    def pay(amount_usd: Any) -> str:
        with tracer.start_as_current_span("POST /charges"):
            return "paid"

    async def apay(amount_usd: Any) -> str:
        await asyncio.sleep(0)
        with tracer.start_as_current_span("POST /charges"):
            return "paid"

    spend = make_spend_skill(pay if sync else apay)
    with tracer.start_as_current_span("agent step") as step:
        assert await spend(sync) == "paid"
    finished = {span.name: span for span in otel.exporter.get_finished_spans()}
    governed = finished["limenex finance.spend"]
    http = finished["POST /charges"]
    assert http.parent is not None
    assert http.parent.span_id == governed.context.span_id
    assert governed.parent is not None
    assert governed.parent.span_id == step.get_span_context().span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # the context is restored


async def test_a_blocked_nested_call_fails_the_outer_one_without_its_reason(
    otel: Otel, make_spend_skill: Any
) -> None:
    """An executor that makes a governed call which is blocked: two spans, one inside the
    other; the inner refusal's message (it may quote params) is not recorded on the outer."""
    spend = make_spend_skill()

    def pay(amount_usd: Any) -> None:
        spend.spend_sync(agent_id="bot-1", service="gcp", amount_usd=amount_usd)

    outer = make_spend_skill(pay)
    with pytest.raises(BlockedError):
        await outer(False)
    inner_span, outer_span = otel.spans()
    assert inner_span.parent is not None
    assert inner_span.parent.span_id == outer_span.context.span_id
    assert attrs(inner_span)["limenex.verdict"] == "BLOCK"
    assert attrs(outer_span)["limenex.verdict"] == "ALLOW"
    assert attrs(outer_span)["limenex.outcome"] == "failed"
    assert attrs(outer_span)["error.type"] == "BlockedError"
    assert [dict(event.attributes or {}) for event in outer_span.events] == [
        {"exception.type": "limenex.core.errors.BlockedError"}
    ]


class ToolError(Exception):
    pass


@pytest.mark.parametrize("sync", SYNC)
async def test_a_wrapped_nested_refusal_leaves_its_params_off_every_span(
    otel: Otel, sync: bool
) -> None:
    """An executor that wraps a nested call's refusal (``raise ToolError(...) from e``):
    the refusal quotes a secret param and sits in the outer exception's ``__cause__``, which
    an exported stack trace would carry; spans get the outer exception's type alone."""
    engine = PolicyEngine(
        InMemoryPolicyStore.from_yaml(POLICY), InMemoryStateStore(), audit_logger=False
    )

    @engine.governed("comms.send")
    def send(agent_id: str, recipient: str, text: str) -> None:
        return None

    def pay(amount_usd: Any) -> None:
        try:
            send(agent_id="bot-1", recipient=SECRET, text="receipt")
        except BlockedError as e:
            raise ToolError(f"could not send the receipt: {e}") from e

    async def apay(amount_usd: Any) -> None:
        pay(amount_usd)

    spend = make_spend(engine, {"openai": apay})

    @engine.governed("finance.spend")
    def spend_sync(agent_id: str, service: str, amount_usd: Any) -> None:
        pay(amount_usd)

    async def call() -> None:
        if sync:
            spend_sync(agent_id="bot-1", service="openai", amount_usd=1)
        else:
            await spend(agent_id="bot-1", service="openai", amount_usd=1)

    with pytest.raises(ToolError) as raised:
        await call()
    assert SECRET in str(raised.value.__cause__)  # the caller still gets the whole chain
    inner_span, outer_span = otel.spans()
    assert attrs(inner_span)["limenex.verdict"] == "BLOCK"
    assert attrs(outer_span)["error.type"] == "ToolError"
    assert outer_span.status.status_code is StatusCode.ERROR
    assert outer_span.status.description == "ToolError"
    (event,) = outer_span.events
    assert event.name == "exception"
    assert set(event.attributes or {}) == {"exception.type"}  # no message, no stack trace
    assert str((event.attributes or {})["exception.type"]).endswith("ToolError")
    assert_no_secret([inner_span, outer_span])
    engine.close()


async def test_decision_duration_excludes_the_executor(otel: Otel, make_spend_skill: Any) -> None:
    async def slow(amount_usd: Any) -> str:
        await asyncio.sleep(0.05)
        return "paid"

    spend = make_spend_skill(slow)
    await spend(False)
    span = otel.span()
    assert span.end_time is not None
    assert span.start_time is not None
    assert (span.end_time - span.start_time) / 1e9 >= 0.05  # the span covers the executor
    assert attrs(span)["limenex.decision.duration"] < 0.05  # the verdict came before it


async def test_no_param_value_reaches_a_span(otel: Otel) -> None:
    """Params may hold secrets and spans have no redaction: none of them is on a span."""
    engine = PolicyEngine(
        InMemoryPolicyStore.from_yaml(POLICY), InMemoryStateStore(), audit_logger=False
    )

    @engine.governed("comms.send")
    def send(agent_id: str, recipient: str, text: str) -> None:
        return None

    secret = SECRET
    send(agent_id="bot-1", recipient="ana@example.com", text=secret)
    with pytest.raises(BlockedError) as blocked:
        send(agent_id="bot-1", recipient=secret, text="hi")
    assert secret in blocked.value.decision.reason  # the reason quotes it...
    engine.evaluate_sync("comms.send", "bot-1", {"recipient": secret, "text": secret})
    spans = otel.spans()
    assert len(spans) == 3
    for span in spans:  # ...the spans do not
        values = [str(v) for v in attrs(span).values()]
        values += [str(v) for e in span.events for v in (e.attributes or {}).values()]
        values += [span.name, str(span.status.description)]
        assert not [v for v in values if secret in v], span.name
    engine.close()


def test_note_shadow_marks_the_current_span(otel: Otel, make_spend_skill: Any) -> None:
    def pay(amount_usd: Any) -> str:
        note_shadow("BLOCK", 3)
        return "paid"

    spend = make_spend_skill(pay)
    spend.spend_sync(agent_id="bot-1", service="openai", amount_usd=1)
    got = attrs(otel.span())
    assert got["limenex.shadow.verdict"] == "BLOCK"
    assert got["limenex.shadow.policy.index"] == 3
    note_shadow("BLOCK", 3)  # no current span: nothing to mark, nothing raised


class _Broken:
    """An SDK part that raises on every use."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"telemetry bug in {name}")

        return fail


@pytest.mark.parametrize("part", ["tracer", "duration", "decisions"])
@pytest.mark.parametrize("sync", SYNC)
async def test_a_failing_sdk_never_changes_a_call(
    otel: Otel,
    make_spend_skill: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    sync: bool,
    part: str,
) -> None:
    spend = make_spend_skill()
    assert await spend(sync) == "paid"  # makes the instruments
    monkeypatch.setattr(limenex.telemetry._instruments, part, _Broken())
    assert await spend(sync) == "paid"
    with pytest.raises(BlockedError):
        await spend(sync, service="gcp")
    assert trace.get_current_span() is trace.INVALID_SPAN  # no context left attached
    assert "limenex: " in caplog.text


# --- metrics ----------------------------------------------------------------------------------


async def test_decisions_counter_counts_per_verdict_and_outcome(
    otel: Otel, make_spend_skill: Any
) -> None:
    spend = make_spend_skill()
    await spend(False)
    spend.spend_sync(agent_id="bot-1", service="openai", amount_usd=1)
    with pytest.raises(BlockedError):
        await spend(False, service="gcp")
    with pytest.raises(EscalationRequired):
        await spend(True, amount_usd=500)
    counts = {
        tuple(sorted(dict(point.attributes).items())): point.value
        for point in otel.points("limenex.decisions")
    }
    skill = ("limenex.skill", "finance.spend")
    assert counts == {
        (("limenex.outcome", "executed"), skill, ("limenex.verdict", "ALLOW")): 2,
        (skill, ("limenex.verdict", "BLOCK")): 1,
        (skill, ("limenex.verdict", "ESCALATE")): 1,
    }


async def test_duration_histogram_gets_one_point_per_decision(
    otel: Otel, make_spend_skill: Any
) -> None:
    spend = make_spend_skill()
    for _ in range(3):
        await spend(False)
    with pytest.raises(BlockedError):
        spend.spend_sync(agent_id="bot-1", service="gcp", amount_usd=1)
    spend.engine.evaluate_sync("finance.spend", "bot-1", {"service": "openai", "amount_usd": 1})
    by_verdict = {
        (dict(p.attributes)["limenex.verdict"], dict(p.attributes).get("limenex.dry_run")): p
        for p in otel.points("limenex.decision.duration")
    }
    assert {key: p.count for key, p in by_verdict.items()} == {
        ("ALLOW", None): 3,
        ("BLOCK", None): 1,
        ("ALLOW", True): 1,
    }
    allowed = by_verdict["ALLOW", None]
    assert 0 < allowed.sum < 1  # seconds
    assert allowed.explicit_bounds[0] == pytest.approx(1e-6)  # buckets fit microseconds


# --- without an SDK ---------------------------------------------------------------------------


def _run(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


ENGINE = f"""
import asyncio, sys
from limenex.core.engine import PolicyEngine
from limenex.core.policy_store import InMemoryPolicyStore
from limenex.core.stores import InMemoryStateStore
from limenex.skills.finance import make_spend
engine = PolicyEngine(
    InMemoryPolicyStore.from_yaml({POLICY!r}), InMemoryStateStore(), audit_logger=False
)
spend = make_spend(engine, {{"openai": lambda amount_usd: "paid"}})
"""


def test_without_a_provider_the_engine_takes_the_plain_path() -> None:
    out = _run(
        ENGINE
        + """
import limenex.telemetry
print(limenex.telemetry.enabled())
print(asyncio.run(spend(agent_id="bot-1", service="openai", amount_usd=1)))
print(limenex.telemetry._instruments is None)
print(any(name.startswith("opentelemetry") for name in sys.modules))
"""
    )
    assert out.split() == ["False", "paid", "True", "False"]  # OTel not even imported


def test_without_an_sdk_an_imported_api_is_still_a_no_op() -> None:
    out = _run(
        ENGINE
        + """
from opentelemetry import metrics, trace
import limenex.telemetry
trace.get_tracer_provider(); metrics.get_meter_provider()  # the API's proxies only
print(limenex.telemetry.enabled())
print(asyncio.run(spend(agent_id="bot-1", service="openai", amount_usd=1)))
print(limenex.telemetry._instruments is None)
"""
    )
    assert out.split() == ["False", "paid", "True"]


def test_a_provider_set_after_the_engine_is_made_is_used() -> None:
    """The done-when of the issue: with the SDK installed, a decision yields a span."""
    out = _run(
        ENGINE
        + """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # after the engine was made
asyncio.run(spend(agent_id="bot-1", service="openai", amount_usd=1))
(span,) = exporter.get_finished_spans()
print(span.attributes["limenex.skill"], span.attributes["limenex.verdict"])
"""
    )
    assert out.split() == ["finance.spend", "ALLOW"]


def test_a_meter_provider_alone_turns_the_instrumented_path_on() -> None:
    out = _run(
        ENGINE
        + """
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import limenex.telemetry
reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
print(limenex.telemetry.enabled())
asyncio.run(spend(agent_id="bot-1", service="openai", amount_usd=1))
data = reader.get_metrics_data()
names = sorted(m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics)
print(*names)
"""
    )
    assert out.split() == ["True", "limenex.decision.duration", "limenex.decisions"]


def test_providers_named_in_the_environment_are_loaded_by_the_engine() -> None:
    out = _run(
        ENGINE
        + """
import limenex.telemetry
print(limenex.telemetry.enabled())
print(asyncio.run(spend(agent_id="bot-1", service="openai", amount_usd=1)))
""",
        OTEL_PYTHON_TRACER_PROVIDER="sdk_tracer_provider",
        OTEL_PYTHON_METER_PROVIDER="sdk_meter_provider",
    )
    assert out.split() == ["True", "paid"]


SHADOW = """
finance.spend:
  policies:
    - type: deterministic
      dimension: spend_usd
      param: amount_usd
      operator: lte
      value: 10
      mode: shadow
      breach_verdict: ESCALATE
"""


@pytest.mark.parametrize("sync", SYNC)
def test_a_shadow_breach_is_on_the_span_of_the_call_that_ran(otel: Otel, sync: bool) -> None:
    engine = PolicyEngine(InMemoryPolicyStore.from_yaml(SHADOW), "memory://", audit_logger=False)
    params = {"service": "aws", "amount_usd": 50}
    if sync:
        assert engine.execute_sync("finance.spend", "a", params, lambda: "ran") == "ran"
    else:

        async def act() -> str:
            return "ran"

        assert asyncio.run(engine.execute("finance.spend", "a", params, act)) == "ran"
    dry = engine.evaluate_sync("finance.spend", "a", params)
    call, dry_run = (attrs(span) for span in otel.spans())
    for got in (call, dry_run):
        assert got["limenex.verdict"] == "ALLOW"
        assert got["limenex.shadow.verdict"] == "ESCALATE"
        assert got["limenex.shadow.policy.index"] == 1
    assert dry.shadow_verdict == "ESCALATE"
    engine.close()
