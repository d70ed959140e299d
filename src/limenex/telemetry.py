"""OpenTelemetry traces and metrics of governed calls (a no-op until you install an SDK).

Limenex depends only on ``opentelemetry-api``. Until a real ``TracerProvider`` or
``MeterProvider`` is set (``opentelemetry.trace.set_tracer_provider``,
``opentelemetry.metrics.set_meter_provider``, or the ``OTEL_PYTHON_*_PROVIDER`` variables
read when the engine is made), a governed call reads two module globals and takes its
ordinary path: no span, no instrument, nothing allocated. Once one is set, in any order
and at any time, every call of :meth:`~limenex.core.engine.PolicyEngine.execute`,
``execute_sync``, ``evaluate``, ``evaluate_sync``, ``resume`` and ``resume_sync`` (and so
every skill a factory or ``@engine.governed`` made) yields:

**One span**, named ``limenex <skill_id>``, kind ``INTERNAL``, current while the call runs,
executor included, so the spans the executor makes (an HTTP client's, a database's) are its
children. Attributes:

=============================  ==========================================================
``limenex.skill``              the skill id
``limenex.agent``              the agent id
``limenex.verdict``            ``ALLOW``, ``BLOCK`` or ``ESCALATE``
``limenex.policy.index``       the deciding policy, 1-based as in reasons ("policy 2")
``limenex.policy.type``        its ``type`` (``deterministic``, ``semantic``, ...)
``limenex.policy.dimension``   its ``dimension``, when it has one
``limenex.request_id``         the approval request of an ESCALATE
``limenex.fail_closed``        ``true`` for a BLOCK from an internal failure (store down…)
``limenex.outcome``            ``executed``, ``failed`` (the executor raised) or
                               ``interrupted`` (cancelled), for an allowed call
``limenex.decision.duration``  seconds from the call to its verdict (the executor excluded;
                               the span's own duration is the whole call)
``limenex.dry_run``            ``true`` for ``evaluate``: nothing ran, nothing changed
``limenex.resumed``            ``true`` for the resume of an approved request
``error.type``                 the exception's class, when the span's status is ``ERROR``
                               (for a fail-closed BLOCK: the failure's class when the
                               engine raised the BLOCK from it, ``_OTHER`` when it is not at
                               hand, as for ``evaluate``, which returns the decision)
=============================  ==========================================================

The status is ``ERROR``, described by the ``error.type`` alone, when the executor raised
(the verdict stays ``ALLOW``), on a fail-closed BLOCK (``execute`` or ``evaluate``), on a
refused input or an unregistered skill (verdict ``BLOCK``), and when the call failed before
any verdict (an approval refused on resume). A BLOCK or ESCALATE by a policy is the engine
working, not an error: status unset. The executor's exception propagates unchanged to the
caller; the span gets an ``exception`` event with its ``exception.type`` only: no
``exception.message``, no ``exception.stacktrace``, since either may quote params (the
traceback holds the whole ``__cause__``/``__context__`` chain, a nested governed call's
refusal included).

**No params, no reason and no exception message on spans.** Spans leave the process
without the audit log's redaction, and a call's params may hold secrets; a decision's reason
may quote them (``service 'x' is not in [...]``), and so may an exception's message or
traceback. A span names the deciding policy instead (index, type, dimension) and an
exception by its type; the audit log keeps the params and the reason, redacted.

**Metrics** (meter ``limenex``): a counter ``limenex.decisions`` (one per decision;
attributes ``limenex.skill``, ``limenex.verdict``, and ``limenex.outcome`` for an allowed
call that ran, ``limenex.dry_run`` for ``evaluate``, ``limenex.fail_closed`` for a
fail-closed BLOCK) and a histogram ``limenex.decision.duration`` (unit ``s``, the time from
the call to its verdict, executor excluded; same attributes less the outcome). Agent ids are
left out of metrics: there may be millions.

:func:`note_shadow` lets an evaluated-but-not-enforced (shadow) policy mark the current
span with what it would have decided.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

from limenex.core.errors import EscalationRequired, LimenexError

if TYPE_CHECKING:
    from opentelemetry.metrics import Counter, Histogram
    from opentelemetry.trace import Span, Tracer

    from limenex.approvals import ApprovalRequest
    from limenex.core.decision import Decision

__all__ = ["enabled", "load_configured_providers", "note_shadow"]

log = logging.getLogger("limenex")

NAME = "limenex"
"""The instrumentation scope of the tracer and the meter (with the package's version)."""

DURATION_BUCKETS = (
    *(1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4),
    *(1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
"""Advised histogram buckets, in seconds: a call takes microseconds in memory, a
millisecond on a remote store, seconds when a model judges a semantic rule."""

FAIL_CLOSED_OTHER = "_OTHER"
"""``error.type`` of a fail-closed BLOCK whose failure is not at hand (see ``_Call``)."""

_modules = sys.modules


def enabled() -> bool:
    """True once a real tracer or meter provider is set; the engine asks on every call.

    It reads the API's own globals (about 0.05 µs) instead of calling
    ``get_tracer_provider()`` (about 0.6 µs); a module nobody imported has no provider.
    """
    trace = _modules.get("opentelemetry.trace")
    if trace is not None and trace._TRACER_PROVIDER is not None:
        return True
    metrics = _modules.get("opentelemetry.metrics._internal")
    return metrics is not None and metrics._METER_PROVIDER is not None


def load_configured_providers() -> None:
    """Load the providers the ``OTEL_PYTHON_TRACER_PROVIDER`` / ``..._METER_PROVIDER``
    variables name, as the API does on its first ``get_*_provider()`` (the engine calls this
    when it is made, since :func:`enabled` never calls those). A provider that cannot be
    loaded is logged and left out: telemetry never stops governance."""
    try:
        if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ:
            from opentelemetry import trace

            trace.get_tracer_provider()
        if "OTEL_PYTHON_METER_PROVIDER" in os.environ:
            from opentelemetry import metrics

            metrics.get_meter_provider()
    except Exception:
        log.warning("limenex: the OpenTelemetry provider named in the environment failed to load")


def note_shadow(verdict: str, policy_index: int) -> None:
    """Mark the current span with what a shadow policy would have decided.

    Sets ``limenex.shadow.verdict`` and ``limenex.shadow.policy.index`` (1-based) on the
    current span when one is recording; otherwise does nothing, cheaply. Call it once per
    governed call, for the first shadow policy breached.
    """
    if not enabled():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("limenex.shadow.verdict", str(verdict))
        span.set_attribute("limenex.shadow.policy.index", int(policy_index))


# --- the instrumented path (taken only when enabled() is true) -----------------------------


class _Instruments:
    """The tracer, the instruments and the API functions the instrumented path uses."""

    __slots__ = (
        "attach",
        "decisions",
        "detach",
        "duration",
        "error_status",
        "internal",
        "set_span_in_context",
        "tracer",
    )

    def __init__(self) -> None:
        from opentelemetry import context, metrics, trace

        from limenex import __version__

        self.attach = context.attach
        self.detach = context.detach
        self.set_span_in_context = trace.set_span_in_context
        self.internal = trace.SpanKind.INTERNAL
        self.error_status = trace.StatusCode.ERROR
        self.tracer: Tracer = trace.get_tracer(NAME, __version__)
        meter = metrics.get_meter(NAME, __version__)
        self.decisions: Counter = meter.create_counter(
            "limenex.decisions",
            unit="{decision}",
            description="Decisions of governed calls, by skill and verdict",
        )
        description = "Time from a governed call to its verdict (the executor excluded)"
        try:
            self.duration: Histogram = meter.create_histogram(
                "limenex.decision.duration",
                unit="s",
                description=description,
                explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            )
        except TypeError:  # opentelemetry-api < 1.23 takes no advice
            self.duration = meter.create_histogram(
                "limenex.decision.duration", unit="s", description=description
            )


_instruments: _Instruments | None = None
_instruments_lock = threading.Lock()


def _get_instruments() -> _Instruments:
    global _instruments  # made once, on the first instrumented call
    made = _instruments
    if made is None:
        with _instruments_lock:
            made = _instruments
            if made is None:
                made = _instruments = _Instruments()
    return made


class _Call:
    """One governed call's span and measurements, from its start to its end."""

    __slots__ = ("acted", "dry_run", "otel", "skill_id", "span", "started", "token")

    def __init__(
        self, skill_id: str, agent_id: object, *, dry_run: bool = False, resumed: bool = False
    ) -> None:
        otel = self.otel = _get_instruments()
        self.skill_id = str(skill_id)
        attributes: dict[str, Any] = {"limenex.skill": self.skill_id}
        if type(agent_id) is str:
            attributes["limenex.agent"] = agent_id
        if dry_run:
            attributes["limenex.dry_run"] = True
        if resumed:
            attributes["limenex.resumed"] = True
        self.dry_run = dry_run
        self.acted: float | None = None
        self.span: Span = otel.tracer.start_span(
            f"{NAME} {self.skill_id}",
            kind=otel.internal,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        self.token = otel.attach(otel.set_span_in_context(self.span))
        self.started = perf_counter()

    def action(self, action: Callable[[], Any]) -> Callable[[], Any]:
        """``action``, noting when the engine lets it run: the verdict's time."""

        def run() -> Any:
            self.acted = perf_counter()
            return action()

        return run

    def decided(self, decision: Decision) -> None:
        """End the call on a decision returned (``evaluate``): no executor ran."""
        try:
            if decision.fail_closed:  # returned, not raised: the failure is not at hand
                self._fail_closed(None)
            self._end(decision.verdict.value, decision, perf_counter() - self.started, None)
        except Exception:
            log.exception("limenex: recording the telemetry of a call failed")
        finally:
            self._close()

    def executed(self) -> None:
        """End an allowed call whose executor returned."""
        try:
            self._allowed("executed")
        except Exception:
            log.exception("limenex: recording the telemetry of a call failed")
        finally:
            self._close()

    def raised(self, exc: BaseException) -> None:
        """End the call on ``exc``: the executor's, a BLOCK/ESCALATE, or a failure."""
        try:
            self._raised(exc)
        except Exception:
            log.exception("limenex: recording the telemetry of a call failed")
        finally:
            self._close()

    def _raised(self, exc: BaseException) -> None:
        if self.acted is not None:  # the executor ran: the verdict was ALLOW
            if isinstance(exc, Exception):
                self._exception(exc)
                self._error(exc)
                self._allowed("failed")
            else:  # cancelled or interrupted: the engine counts the amount as spent
                self._allowed("interrupted")
            return
        decision = exc.decision if isinstance(exc, LimenexError) else None
        if decision is None:  # failed before any verdict (e.g. an approval refused)
            self._error(exc)
            return
        if isinstance(exc, EscalationRequired):
            self.span.set_attribute("limenex.request_id", exc.request_id)
        if decision.fail_closed:
            self._fail_closed(exc.__cause__)
        elif decision.policy_index is None:  # a refused input or an unregistered skill
            self._error(exc)
        self._end(decision.verdict.value, decision, perf_counter() - self.started, None)

    def _allowed(self, outcome: str) -> None:
        acted = self.acted
        elapsed = (perf_counter() if acted is None else acted) - self.started
        self._end("ALLOW", None, elapsed, outcome)

    def _end(
        self, verdict: str, decision: Decision | None, elapsed: float, outcome: str | None
    ) -> None:
        attributes: dict[str, Any] = {
            "limenex.verdict": verdict,
            "limenex.decision.duration": elapsed,
        }
        labels: dict[str, Any] = {"limenex.skill": self.skill_id, "limenex.verdict": verdict}
        if self.dry_run:
            labels["limenex.dry_run"] = True
        if decision is not None:
            if decision.policy_index is not None:
                attributes["limenex.policy.index"] = decision.policy_index + 1
            policy = decision.policy
            if policy is not None:
                attributes["limenex.policy.type"] = str(policy.type)
                dimension = getattr(policy, "dimension", None)
                if dimension is not None:
                    attributes["limenex.policy.dimension"] = str(dimension)
            if decision.fail_closed:
                attributes["limenex.fail_closed"] = True
                labels["limenex.fail_closed"] = True
            shadow = decision.shadow_verdict
            if shadow is not None:
                attributes["limenex.shadow.verdict"] = shadow.value
                attributes["limenex.shadow.policy.index"] = (
                    decision.shadow[0].policy_index or 0
                ) + 1
        otel = self.otel
        otel.duration.record(elapsed, labels)
        if outcome is not None:
            attributes["limenex.outcome"] = outcome
            labels["limenex.outcome"] = outcome
        otel.decisions.add(1, labels)
        self.span.set_attributes(attributes)

    def _error(self, exc: BaseException) -> None:
        self._error_type(type(exc).__qualname__)

    def _error_type(self, kind: str) -> None:
        """Status ``ERROR`` described by ``kind`` alone, which is also ``error.type``."""
        self.span.set_attribute("error.type", kind)
        self.span.set_status(self.otel.error_status, kind)

    def _fail_closed(self, cause: BaseException | None) -> None:
        """Mark a fail-closed BLOCK: ``error.type`` is the class of the failure the engine
        chained to its ``BlockedError`` (``raise ... from``), else ``_OTHER`` (OpenTelemetry's
        value for an error of no known type): a decision returned by ``evaluate``, or one
        raised without its cause, carries the failure only in its reason, which stays off
        spans."""
        self._error_type(FAIL_CLOSED_OTHER if cause is None else type(cause).__qualname__)

    def _exception(self, exc: BaseException) -> None:
        """Record the executor's exception as an ``exception`` event with its type alone.

        Never ``record_exception``: its ``exception.message`` and ``exception.stacktrace``
        (which holds the whole ``__cause__``/``__context__`` chain) may quote params, the
        executor's own or a nested governed call's refusal."""
        kind = type(exc)
        module = kind.__module__
        name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        self.span.add_event("exception", {"exception.type": name})

    def _close(self) -> None:
        try:
            self.otel.detach(self.token)
            self.span.end()
        except Exception:
            log.exception("limenex: ending the span of a call failed")


def _begin(
    skill_id: str, agent_id: object, *, dry_run: bool = False, resumed: bool = False
) -> _Call | None:
    """A call's telemetry, or ``None`` (logged) when the SDK fails: never stop the call."""
    try:
        return _Call(skill_id, agent_id, dry_run=dry_run, resumed=resumed)
    except Exception:
        log.exception("limenex: starting the span of a call failed; it runs untraced")
        return None


async def execute(
    run: Callable[..., Awaitable[Any]],
    skill_id: str,
    agent_id: str,
    params: Mapping[str, Any],
    action: Callable[[], Any],
    *,
    action_name: str,
    approval: ApprovalRequest | None,
) -> Any:
    """``await run(...)`` (the engine's ``_execute``) inside a span, measured."""
    call = _begin(skill_id, agent_id, resumed=approval is not None)
    if call is None:
        return await run(
            skill_id, agent_id, params, action, action_name=action_name, _approval=approval
        )
    try:
        result = await run(
            skill_id,
            agent_id,
            params,
            call.action(action),
            action_name=action_name,
            _approval=approval,
        )
    except BaseException as exc:
        call.raised(exc)
        raise
    call.executed()
    return result


def execute_sync(
    run: Callable[..., Any],
    skill_id: str,
    agent_id: str,
    params: Mapping[str, Any],
    action: Callable[[], Any],
    *,
    action_name: str,
    approval: ApprovalRequest | None,
) -> Any:
    """``run(...)`` (the engine's ``_execute_sync``) inside a span, measured."""
    call = _begin(skill_id, agent_id, resumed=approval is not None)
    if call is None:
        return run(skill_id, agent_id, params, action, action_name=action_name, _approval=approval)
    try:
        result = run(
            skill_id,
            agent_id,
            params,
            call.action(action),
            action_name=action_name,
            _approval=approval,
        )
    except BaseException as exc:
        call.raised(exc)
        raise
    call.executed()
    return result


async def evaluate(
    run: Callable[[str, str, Mapping[str, Any]], Awaitable[Decision]],
    skill_id: str,
    agent_id: str,
    params: Mapping[str, Any],
) -> Decision:
    """``await run(...)`` (the engine's ``_evaluate``) inside a dry-run span, measured."""
    call = _begin(skill_id, agent_id, dry_run=True)
    if call is None:
        return await run(skill_id, agent_id, params)
    try:
        decision = await run(skill_id, agent_id, params)
    except BaseException as exc:
        call.raised(exc)
        raise
    call.decided(decision)
    return decision


def evaluate_sync(
    run: Callable[[str, str, Mapping[str, Any]], Decision],
    skill_id: str,
    agent_id: str,
    params: Mapping[str, Any],
) -> Decision:
    """``run(...)`` (the engine's ``_evaluate_sync``) inside a dry-run span, measured."""
    call = _begin(skill_id, agent_id, dry_run=True)
    if call is None:
        return run(skill_id, agent_id, params)
    try:
        decision = run(skill_id, agent_id, params)
    except BaseException as exc:
        call.raised(exc)
        raise
    call.decided(decision)
    return decision
