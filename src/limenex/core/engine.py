"""The policy engine: evaluate a call, reserve atomically, execute, then settle.

A governed call goes through these steps, identically on the sync and the async path:

1. **check the inputs** (:func:`~limenex.core.evaluation.plan_call`): a bad argument raises
   :class:`~limenex.core.errors.InvalidArgumentError`; nothing runs, nothing is recorded;
2. **decide in order**: stateless policies in Python, every stateful check of the call in
   one atomic ``reserve`` of the state store, then the semantic rules that come before the
   first deterministic breach (a model is never asked when an earlier policy decided);
3. **BLOCK** raises :class:`BlockedError`, **ESCALATE** raises :class:`EscalationRequired`,
   and any reservation is released;
4. **ALLOW** runs the executor: when it returns the reservation is committed; when it raises
   an ``Exception`` the reservation is released and the exception propagates unchanged;
   when it is interrupted (cancellation, ``KeyboardInterrupt``) the amount stays counted,
   since we cannot know the action did not happen.

Every internal failure (policy store, state store, evaluator plumbing, audit sink) ends in
BLOCK with ``decision.fail_closed`` set, never in ALLOW.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Generator, Mapping
from concurrent.futures import Future
from decimal import Decimal
from time import perf_counter
from types import CoroutineType
from typing import Any, Literal, NoReturn, ParamSpec, TypeVar, cast

from limenex import telemetry as _telemetry
from limenex.approvals import (
    ApprovalRefused,
    ApprovalRequest,
    Approvals,
    ApprovalStatus,
    ApprovalStore,
    InMemoryApprovalStore,
    approval_store_for,
    fingerprint,
    policies_digest,
    request_from_decision,
)
from limenex.approvals.request import refused
from limenex.audit import AuditLog, BufferedAuditLog, JsonlSink, redact_from_env
from limenex.audit import path_for as audit_path_for
from limenex.core.clock import Clock, SystemClock
from limenex.core.decision import Decision, Verdict
from limenex.core.errors import (
    BlockedError,
    EscalationRequired,
    EvaluatorError,
    GovernanceSignal,
    InvalidArgumentError,
    LimenexConfigError,
    LimenexError,
    StateStoreError,
    UnregisteredSkillError,
)
from limenex.core.evaluation import (
    CompiledSkill,
    Intent,
    Plan,
    allow_decision,
    check_agent_id,
    compile_skill,
    first_state_breach,
    normalise_path,
    plan_call,
    semantic_decision,
    shadow_state,
    state_decision,
    to_decimal,
)
from limenex.core.explain import Explanation, explanation, stateful_checks
from limenex.core.handle import SkillHandle
from limenex.core.policy import counted
from limenex.core.policy_store import LocalFilePolicyStore, PolicyReload, PolicyStore
from limenex.core.state import Reservation, StateBreach, StateStore
from limenex.semantic import Judgement, parse_answer
from limenex.telemetry import enabled as _traced

__all__ = [
    "AuditHook",
    "BlockedError",
    "EscalationRequired",
    "LimenexConfigError",
    "PolicyEngine",
]

log = logging.getLogger("limenex")

P = ParamSpec("P")
R = TypeVar("R")

AuditHook = Callable[[str, Decision, Mapping[str, Any]], None]
"""``(event, decision, params)``. Events: ``allowed`` (before the action runs), ``executed``,
``failed``, ``blocked``, ``escalated``, ``resumed``. An :class:`~limenex.audit.AuditLog` or
:class:`~limenex.audit.BufferedAuditLog` also gets ``started=`` (the call's
``time.perf_counter()``), ``state=`` (the counters before and after) and ``request_id=``."""

ActionBuilder = Callable[[dict[str, Any]], "Action"]
"""``params -> action``: how a resumed approval request performs its action again."""

Action = Callable[[], Any]
"""A zero-argument callable that performs the action (may return an awaitable)."""


class PolicyEngine:
    """Decides every governed call: ALLOW, BLOCK or ESCALATE.

    ``policy_store`` is a :class:`PolicyStore` or the path of a policy file;
    ``state_store`` a :class:`StateStore` or a store URL (``memory://``,
    ``sqlite:///.limenex/state.db``, ``redis://...``; see :mod:`limenex.stores`). The default
    is the embedded durable store: SQLite in ``state.db`` beside the policy file, or in
    ``.limenex/state.db`` when the policies do not come from a file.
    ``llm_evaluator`` judges semantic policies (see :mod:`limenex.semantic`);
    ``semantic_timeout`` bounds each judgement.

    ``audit_logger`` is called for every decision and outcome; if it fails before the action,
    the action is blocked. By default it is a :class:`~limenex.audit.BufferedAuditLog` to the
    JSONL file :func:`limenex.audit.path_for` names (``audit.log`` beside a file or SQLite
    state store, else ``.limenex/audit.log``); ``audit_logger=False`` turns auditing off.
    An edited policy file that a :class:`LocalFilePolicyStore` reloads (hot reload) is
    recorded there too, as ``policies_reloaded``, or ``policies_rejected`` when it was
    refused and the last good policies stay in force.

    An ESCALATE keeps an approval request (see :mod:`limenex.approvals`) in
    ``approval_store``, by default the one kept next to the state store, valid for
    ``approval_ttl`` seconds; ``on_escalation(request)`` (sync or async) is then told. Humans
    act through :attr:`approvals`; :meth:`resume` runs an approved request's action once.
    """

    def __init__(
        self,
        policy_store: PolicyStore | str | os.PathLike[str],
        state_store: StateStore | str | None = None,
        llm_evaluator: Callable[..., Any] | None = None,
        audit_logger: AuditHook | Literal[False] | None = None,
        *,
        clock: Clock | None = None,
        semantic_timeout: float = 10.0,
        approval_store: ApprovalStore | None = None,
        approval_ttl: float = 24 * 3600.0,
        on_escalation: Callable[[ApprovalRequest], Any] | None = None,
    ) -> None:
        if isinstance(policy_store, str | os.PathLike):
            policy_store = LocalFilePolicyStore(policy_store)
        if not isinstance(policy_store, PolicyStore):
            raise LimenexConfigError(
                "policy_store must be a PolicyStore (e.g. LocalFilePolicyStore) or a path, "
                f"got {type(policy_store).__name__}"
            )
        if llm_evaluator is not None and not callable(llm_evaluator):
            raise LimenexConfigError("llm_evaluator must be callable: (intent, rule) -> verdict")
        if audit_logger not in (None, False) and not callable(audit_logger):
            raise LimenexConfigError("audit_logger must be callable: (event, decision, params)")
        if approval_store is not None and not isinstance(approval_store, ApprovalStore):
            raise LimenexConfigError(
                f"approval_store must be an ApprovalStore, got {type(approval_store).__name__}"
            )
        if type(approval_ttl) not in (int, float) or not 0 < approval_ttl < float("inf"):
            raise LimenexConfigError("approval_ttl must be a positive number of seconds")
        if on_escalation is not None and not callable(on_escalation):
            raise LimenexConfigError("on_escalation must be callable: (request) -> None")
        if not semantic_timeout > 0:
            raise LimenexConfigError("semantic_timeout must be a positive number of seconds")
        # Last: a store opened (and a database file made) for a refused engine would leak.
        if state_store is None:
            state_store = _default_state_store(policy_store)
        elif isinstance(state_store, str):
            from limenex.stores import from_url

            state_store = from_url(state_store)
        if not isinstance(state_store, StateStore):
            raise LimenexConfigError(
                f"state_store must be a StateStore or a URL, got {type(state_store).__name__}"
            )
        self.policy_store = policy_store
        self.state_store = state_store
        self.llm_evaluator = llm_evaluator
        self._owns_audit = audit_logger is None  # close() closes only what it made
        if audit_logger is None:
            audit_logger = _default_audit_log(state_store)
        self.audit_logger: AuditHook | None = None if audit_logger is False else audit_logger
        # Our own logs take the call's latency, state change and request id too.
        self._rich_audit = isinstance(audit_logger, AuditLog | BufferedAuditLog)
        # The buffered log takes an allowed call's outcome straight from the call's path.
        self._buffer = audit_logger if isinstance(audit_logger, BufferedAuditLog) else None
        self._approval_store = approval_store
        self.approval_ttl = float(approval_ttl)
        self.on_escalation = on_escalation
        self._approvals: Approvals | None = None
        self._actions: dict[tuple[str, str], ActionBuilder] = {}
        self._executors: dict[tuple[str, str], object] = {}
        self._digests: dict[str, tuple[CompiledSkill, str]] = {}
        self._cwd = os.getcwd()
        self.clock: Clock = clock or SystemClock()
        self.semantic_timeout = float(semantic_timeout)
        self._compiled: dict[str, CompiledSkill] = {}
        # Stores that only implement the sync methods are called directly on the async path.
        self._store_is_direct = type(state_store).areserve is StateStore.areserve
        self._loop_thread: _LoopThread | None = None
        self._loop_lock = threading.Lock()
        self._orphans: set[asyncio.Future[None]] = set()
        _telemetry.load_configured_providers()  # those OTEL_PYTHON_*_PROVIDER name
        # A store that reloads edited files (LocalFilePolicyStore) says so: it is audited.
        # The store holds only a weak reference: an engine dropped without close() is
        # collected, and its subscription ends with it.
        subscribe = getattr(policy_store, "subscribe", None)
        self._unsubscribe: Callable[[], object] | None = None
        if callable(subscribe):
            self._unsubscribe = subscribe(_weak_listener(self))
            weakref.finalize(self, self._unsubscribe)

    # --- public API -----------------------------------------------------------------------

    async def evaluate(self, skill_id: str, agent_id: str, params: Mapping[str, Any]) -> Decision:
        """The verdict this call would get now. Changes no state and runs no executor."""
        if _traced():  # an OpenTelemetry SDK is installed: see limenex.telemetry
            return await _telemetry.evaluate(self._evaluate, skill_id, agent_id, params)
        return await self._evaluate(skill_id, agent_id, params)

    async def _evaluate(self, skill_id: str, agent_id: str, params: Mapping[str, Any]) -> Decision:
        plan = self._plan(skill_id, agent_id, params)
        decision = plan.breach
        if plan.checks:
            try:
                totals = await self.state_store.apeek(plan.checks, self.clock.now())
            except Exception as exc:
                return self._failure(skill_id, agent_id, "the state store", exc)
            decision = self._decide_by_totals(plan, totals)
        decision = await self._judge(plan, decision)
        return _with_shadow(plan, decision) if decision else allow_decision(plan)

    def evaluate_sync(self, skill_id: str, agent_id: str, params: Mapping[str, Any]) -> Decision:
        """:meth:`evaluate` for synchronous code (safe inside a running event loop)."""
        if _traced():
            return _telemetry.evaluate_sync(self._evaluate_sync, skill_id, agent_id, params)
        return self._evaluate_sync(skill_id, agent_id, params)

    def _evaluate_sync(self, skill_id: str, agent_id: str, params: Mapping[str, Any]) -> Decision:
        plan = self._plan(skill_id, agent_id, params)
        decision = plan.breach
        if plan.checks:
            try:
                totals = self.state_store.peek(plan.checks, self.clock.now())
            except Exception as exc:
                return self._failure(skill_id, agent_id, "the state store", exc)
            decision = self._decide_by_totals(plan, totals)
        decision = self._judge_sync(plan, decision)
        return _with_shadow(plan, decision) if decision else allow_decision(plan)

    async def explain(
        self,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        *,
        judge: bool = True,
    ) -> Explanation:
        """Why this call would get its verdict now: the verdict and a per-policy trace.

        The verdict is :meth:`evaluate`'s, from the same plan and totals; the trace shows
        every policy with what it compared, also those after the one that decided. Changes
        no state, runs no executor, writes no audit record. ``judge=False`` asks no model:
        semantic rules the verdict depends on are listed as not judged. A state store that
        cannot be read raises :class:`~limenex.core.errors.StateStoreError` (this is a
        diagnosis, not a governed call).
        """
        now = self.clock.now()
        plan = self._plan(skill_id, agent_id, params, now=now)
        amounts = {name: to_decimal(name, params[name]) for name in plan.skill.amount_params}
        checks = stateful_checks(plan.skill, agent_id, params, amounts)
        try:
            totals = await self.state_store.apeek(checks, now) if checks else ()
        except LimenexError:
            raise
        except Exception as exc:
            raise StateStoreError(
                f"reading the totals failed: {type(exc).__name__}: {exc}"
            ) from exc
        if len(totals) != len(checks):
            raise StateStoreError(f"the store answered {len(totals)} totals for {len(checks)}")
        by_policy = {check.policy_index: total for check, total in zip(checks, totals, strict=True)}
        decision = plan.breach
        if plan.checks:
            planned = tuple(by_policy[check.policy_index] for check in plan.checks)
            decision = self._decide_by_totals(plan, planned)
        skipped: list[int] = []  # semantic rules the engine would ask, left unasked here
        if judge:
            decision = await self._judge(plan, decision)
        else:
            limit = len(plan.skill.steps) if decision is None else decision.policy_index
            if limit is not None:  # None: a fail-closed BLOCK, which asks no model
                skipped = [step.index for step in plan.semantic if step.index < limit]
        decision = _with_shadow(plan, decision) if decision else allow_decision(plan)
        return explanation(plan, decision, checks, totals, amounts, now, skipped)

    def explain_sync(
        self,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        *,
        judge: bool = True,
    ) -> Explanation:
        """:meth:`explain` for synchronous code (runs on the engine's helper loop)."""
        explained: Explanation = self._await_elsewhere(
            self.explain(skill_id, agent_id, params, judge=judge)
        )
        return explained

    async def execute(
        self,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        action: Action,
        *,
        action_name: str = "",
        _approval: ApprovalRequest | None = None,
    ) -> Any:
        """Govern one call: decide, and on ALLOW run ``action()`` and settle the state.

        ``action_name`` names the function ``action`` calls when the skill id alone does not
        tell (it is kept in an approval request, and :meth:`resume` runs only the action
        registered under that name: see :meth:`register_action`).
        """
        if _traced():  # an OpenTelemetry SDK is installed: see limenex.telemetry
            return await _telemetry.execute(
                self._execute,
                skill_id,
                agent_id,
                params,
                action,
                action_name=action_name,
                approval=_approval,
            )
        return await self._execute(
            skill_id, agent_id, params, action, action_name=action_name, _approval=_approval
        )

    async def _execute(
        self,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        action: Action,
        *,
        action_name: str = "",
        _approval: ApprovalRequest | None = None,
    ) -> Any:
        started = perf_counter() if self._rich_audit else None
        plan = self._plan(skill_id, agent_id, params, _approval)
        direct = self._store_is_direct  # sync-only stores are called inline: no extra await
        store = self.state_store
        reservation: Reservation | None = None
        decision = plan.breach
        if plan.checks:
            try:
                if decision is not None:  # refused already; an earlier stateful policy may decide
                    totals = (
                        store.peek(plan.checks, self.clock.now())
                        if direct
                        else (await store.apeek(plan.checks, self.clock.now()))
                    )
                    outcome: Reservation | StateBreach | None = None
                elif direct:
                    outcome = store.reserve(plan.checks, self.clock.now())
                else:
                    outcome = await self._areserve(plan)
            except Exception as exc:
                raise self._fail(plan, "the state store", exc) from exc
            if outcome is None:
                decision = self._decide_by_totals(plan, totals)
            elif type(outcome) is StateBreach:
                decision = state_decision(plan, outcome)
                if plan.shadow_checks and plan.shadow_checks[0] < outcome.position:
                    await self._ashadow_before(plan, outcome.position)
            else:
                reservation = outcome  # type: ignore[assignment]  # a Reservation: no cast() call
                if plan.shadow_checks:
                    shadow_state(plan, reservation.observed)  # type: ignore[union-attr]
        if plan.semantic:
            try:
                decision = await self._judge(plan, decision)
            except BaseException:
                await self._asettle(reservation, release=True)
                raise
        if decision is not None:
            await self._asettle(reservation, release=True)
            if plan.shadow:
                decision = _with_shadow(plan, decision)
            if decision.verdict is Verdict.ESCALATE:
                await self._aescalate(plan, decision, started, action_name, _approval)
            self._refuse(plan, decision, started, _approval)
        allowed = self._admit(plan, reservation, started)
        if _approval is not None:  # last: a refusal above leaves the approval unspent
            try:
                used = await self.approval_store.aconsume(
                    _approval.id, _approval.fingerprint, self.clock.now()
                )
            except BaseException:
                await self._asettle(reservation, release=True)
                raise
            self._resumed(plan, used, started)
        try:
            result = action()
            if type(result) is CoroutineType or inspect.isawaitable(result):
                result = await result
        except Exception:
            await self._asettle(reservation, release=True)
            self._after_action(plan, "failed", allowed, started, None)
            raise
        except BaseException:
            await self._asettle(reservation, release=False)
            raise
        if reservation is not None:
            if direct:
                self._settle(reservation, release=False)
            else:
                await self._asettle(reservation, release=False)
        self._after_action(plan, "executed", allowed, started, reservation)
        return result

    def execute_sync(
        self,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        action: Action,
        *,
        action_name: str = "",
        _approval: ApprovalRequest | None = None,
    ) -> Any:
        """:meth:`execute` for synchronous code; safe from many threads and inside a loop.

        The action must not return an awaitable: a coroutine cannot be run to completion
        here, so the call is refused (and the coroutine closed) rather than counted as done.
        (:meth:`resume_sync` alone runs an async action to its end, on a helper thread.)
        """
        if _traced():
            return _telemetry.execute_sync(
                self._execute_sync,
                skill_id,
                agent_id,
                params,
                action,
                action_name=action_name,
                approval=_approval,
            )
        return self._execute_sync(
            skill_id, agent_id, params, action, action_name=action_name, _approval=_approval
        )

    def _execute_sync(
        self,
        skill_id: str,
        agent_id: str,
        params: Mapping[str, Any],
        action: Action,
        *,
        action_name: str = "",
        _approval: ApprovalRequest | None = None,
    ) -> Any:
        started = perf_counter() if self._rich_audit else None
        plan = self._plan(skill_id, agent_id, params, _approval)
        store = self.state_store
        reservation: Reservation | None = None
        decision = plan.breach
        if plan.checks:
            try:
                if decision is not None:  # refused already; an earlier stateful policy may decide
                    decision = self._decide_by_totals(
                        plan, store.peek(plan.checks, self.clock.now())
                    )
                else:
                    outcome = store.reserve(plan.checks, self.clock.now())
                    if type(outcome) is StateBreach:
                        decision = state_decision(plan, outcome)
                        if plan.shadow_checks and plan.shadow_checks[0] < outcome.position:
                            self._shadow_before(plan, outcome.position)
                    else:
                        reservation = outcome  # type: ignore[assignment]
                        if plan.shadow_checks:
                            shadow_state(plan, reservation.observed)  # type: ignore[union-attr]
            except Exception as exc:
                raise self._fail(plan, "the state store", exc) from exc
        if plan.semantic:
            try:
                decision = self._judge_sync(plan, decision)
            except BaseException:
                self._settle(reservation, release=True)
                raise
        if decision is not None:
            self._settle(reservation, release=True)
            if plan.shadow:
                decision = _with_shadow(plan, decision)
            if decision.verdict is Verdict.ESCALATE:
                self._escalate(plan, decision, started, action_name, _approval)
            self._refuse(plan, decision, started, _approval)
        allowed = self._admit(plan, reservation, started)
        if _approval is not None:  # last: a refusal above leaves the approval unspent
            try:
                used = self.approval_store.consume(
                    _approval.id, _approval.fingerprint, self.clock.now()
                )
            except BaseException:
                self._settle(reservation, release=True)
                raise
            self._resumed(plan, used, started)
        try:
            result = action()
            if _approval is not None and result is not None and inspect.isawaitable(result):
                result = self._await_elsewhere(result)  # resume_sync of an async executor
        except Exception:
            self._settle(reservation, release=True)
            self._after_action(plan, "failed", allowed, started, None)
            raise
        except BaseException:
            self._settle(reservation, release=False)
            raise
        if result is not None and inspect.isawaitable(result):
            if inspect.iscoroutine(result):
                result.close()  # never started, so nothing happened
            self._settle(reservation, release=True)
            raise LimenexConfigError(
                f"{skill_id}: the executor returned an awaitable on the synchronous path; "
                "govern async executors with an async skill or an `async def` function"
            )
        self._settle(reservation, release=False)
        self._after_action(plan, "executed", allowed, started, reservation)
        return result

    def governed(
        self, skill_id: str, agent_id_param: str = "agent_id", *, name: str | None = None
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate any sync or async function: it becomes the skill's executor.

        The function's arguments (bound to its signature, defaults applied) are the
        call's params; ``agent_id_param`` names the one that identifies the agent.

        ``name`` names the function in its approval requests (by default its module and
        qualified name), so that :meth:`resume` runs this function and no other. Two
        different callables under one skill and one name (closures of one factory,
        instances of one class, lambdas, partials) are refused: give each its ``name``.
        """

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            signature = inspect.signature(fn)
            if agent_id_param not in signature.parameters:
                raise LimenexConfigError(
                    f"@governed({skill_id!r}): {fn.__qualname__} has no parameter "
                    f"{agent_id_param!r} to read the agent id from"
                )
            self._check_signature(skill_id, fn, signature)

            bind = _binder(skill_id, signature, agent_id_param)
            action_name = _action_name(fn) if name is None else name
            self.register_action(skill_id, _rebuilder(fn, signature), name=action_name, executor=fn)

            if _is_async_callable(fn):

                @functools.wraps(fn)
                async def governed_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                    agent_id, params = bind(args, kwargs)
                    return await self.execute(
                        skill_id,
                        agent_id,
                        params,
                        lambda: fn(*args, **kwargs),
                        action_name=action_name,
                    )

                governed_async.__limenex__ = SkillHandle(  # type: ignore[attr-defined]
                    self, skill_id, governed_async, agent_id_param
                )
                return cast(Callable[P, R], governed_async)

            @functools.wraps(fn)
            def governed_sync(*args: P.args, **kwargs: P.kwargs) -> R:
                agent_id, params = bind(args, kwargs)
                return cast(
                    R,
                    self.execute_sync(
                        skill_id,
                        agent_id,
                        params,
                        lambda: fn(*args, **kwargs),
                        action_name=action_name,
                    ),
                )

            governed_sync.__limenex__ = SkillHandle(  # type: ignore[attr-defined]
                self, skill_id, governed_sync, agent_id_param
            )
            return governed_sync

        return decorate

    def register_action(
        self,
        skill_id: str,
        build: ActionBuilder,
        *,
        name: str = "",
        executor: object = None,
    ) -> None:
        """How :meth:`resume` performs ``skill_id``'s action: ``build(params)`` -> action.

        ``name`` is the ``action_name`` the calls pass to :meth:`execute`: a request is resumed
        only by the builder registered under its skill *and* name, so two functions governed
        as one skill never stand in for each other. The built-in skills (whose registry key is
        in the params) register under ``""``; :meth:`governed` under the function's module and
        qualified name. A skill made again (in a new process, after a restart) registers
        again; the last one made is used. ``executor``, when given, identifies what the
        builder calls (the function, or a registry's snapshot): another one under the same
        skill and name is refused, since a resume could not tell them apart.
        """
        if not callable(build):
            raise LimenexConfigError(f"{skill_id}: the action builder must be callable")
        known = self._executors.get((skill_id, name))
        if executor is not None and known is not None and known != executor:
            raise LimenexConfigError(
                f"{skill_id}: {name!r} already names another executor of this skill on this "
                "engine, and an approved request must resume exactly the function it was "
                "made by; give each its own name (engine.governed(skill_id, name=...), "
                "make_spend(engine, registry, name=...))"
            )
        self._actions[(skill_id, name)] = build
        if executor is not None:
            self._executors[(skill_id, name)] = executor

    def own_files(self) -> tuple[str, ...]:
        """The files this engine depends on: its policy files, state, approvals, audit log.

        Absolute and normalised. :meth:`refuse_own_files` keeps governed calls off them, and
        the siblings a store keeps beside each (``state.db-wal``, ``state.json.pending``).
        """
        found: list[str] = []
        policy_set = getattr(self.policy_store, "policy_set", None)  # a property or a method
        if callable(policy_set):
            policy_set = policy_set()
        found.extend(str(source) for source in getattr(policy_set, "sources", ()))
        found.append(str(getattr(self.policy_store, "path", "") or ""))
        for store in (self.state_store, self._approval_store):
            found.append(str(getattr(store, "path", "") or ""))
        if self._approval_store is None:  # where approval_store_for would keep them
            from limenex.core.stores import LocalFileStateStore

            if isinstance(self.state_store, LocalFileStateStore):
                found.append(os.path.splitext(self.state_store.path)[0] + ".approvals.json")
        sink = getattr(getattr(self.audit_logger, "log", self.audit_logger), "sink", None)
        found.append(str(getattr(sink, "path", "") or ""))
        # Relative paths are read as the stores read them: from where the engine was made.
        return tuple(
            sorted({normalise_path(os.path.join(self._cwd, path)) for path in found if path})
        )

    def refuse_own_files(
        self, skill_id: str, agent_id: str, params: Mapping[str, Any], *paths: str
    ) -> None:
        """Raise :class:`BlockedError` (audited) if a path is one of :meth:`own_files`.

        A path matches a file, a sibling named after it (``<file>.x``, ``<file>-x``) or a
        folder holding one: a governed call must never rewrite, delete or move the policies,
        the state, the approvals or the audit log it is judged by, whatever the policies say.
        The built-in filesystem skills call it before evaluating.
        """
        own = self.own_files()
        inodes = {_inode(file) for file in own} - {None}
        for path in paths:
            for file in own:
                if (
                    path == file
                    or path.startswith((file + ".", file + "-"))
                    or file.startswith(path.rstrip(os.sep) + os.sep)
                    or _inode(path) in inodes  # another name for it (a hard link)
                ):
                    decision = Decision(
                        Verdict.BLOCK,
                        skill_id,
                        agent_id if isinstance(agent_id, str) else "",
                        f"{skill_id}: {path} is, or holds, one of the files this engine is "
                        "governed by (policies, state, approvals, audit log); no governed "
                        "call may change it.",
                    )
                    self._audit("blocked", decision, params, fail_closed=False)
                    raise BlockedError(decision)

    @property
    def approval_store(self) -> ApprovalStore:
        """Where approval requests are kept (by default next to the state store)."""
        store = self._approval_store
        if store is None:
            try:
                store = approval_store_for(self.state_store)
            except LimenexConfigError:
                log.warning(
                    "limenex: no approval store is known for %s; approval requests are kept "
                    "in memory and lost when the process ends (pass approval_store=)",
                    type(self.state_store).__name__,
                )
                store = InMemoryApprovalStore()
            self._approval_store = store
        return store

    @property
    def approvals(self) -> Approvals:
        """Approval requests, for humans: ``await engine.approvals.approve(id, approver=)``."""
        if self._approvals is None:
            hook = self.audit_logger
            audit = hook if isinstance(hook, AuditLog | BufferedAuditLog) else None
            self._approvals = Approvals(self.approval_store, audit=audit, clock=self.clock.now)
        return self._approvals

    async def resume(self, request_id: str) -> Any:
        """Run an approved request's action once and return its result.

        The call is evaluated again as it is now, with the ESCALATE policy the human approved
        waived for this exact call. Every other policy applies: a BLOCK raises
        :class:`BlockedError`, another ESCALATE breached now raises
        :class:`EscalationRequired` with a new request; either way this request stays
        approved. The approval is consumed atomically as the last step before the action
        runs, so of any number of resumes, in any process, one runs it; the others, and any
        denied, expired, unknown or pending request, raise
        :class:`~limenex.approvals.ApprovalRefused`.
        """
        found = await self.approval_store.aget(request_id, self.clock.now())
        try:
            request, params, action = self._resumable(request_id, found)
            return await self.execute(
                request.skill_id,
                request.agent_id,
                params,
                action,
                action_name=request.action,
                _approval=request,
            )
        except ApprovalRefused as refusal:
            self._refused_resume(found, refusal)
            raise

    def resume_sync(self, request_id: str) -> Any:
        """:meth:`resume` for synchronous code and synchronous executors."""
        found = self.approval_store.get(request_id, self.clock.now())
        try:
            request, params, action = self._resumable(request_id, found)
            return self.execute_sync(
                request.skill_id,
                request.agent_id,
                params,
                action,
                action_name=request.action,
                _approval=request,
            )
        except ApprovalRefused as refusal:
            self._refused_resume(found, refusal)
            raise

    def _policies_reloaded(self, event: PolicyReload) -> None:
        """Audit a reload of the policy files: ``policies_reloaded`` or ``policies_rejected``."""
        hook = self.audit_logger
        if not isinstance(hook, AuditLog | BufferedAuditLog):
            return
        counts = event.counts
        in_force = (
            f"{counted(counts.skills, 'skill', 'skills')}, "
            f"{counted(counts.policies, 'policy', 'policies')}"
        )
        try:
            if event.error is None:
                hook.write_event(
                    "policies_reloaded",
                    f"policies reloaded from {event.path}: {in_force}",
                    path=event.path,
                    sources=list(event.sources),
                    skills=counts.skills,
                    policies=counts.policies,
                )
            else:
                error = event.error
                hook.write_event(
                    "policies_rejected",
                    f"policy file refused, the last good policies stay in force "
                    f"({in_force}): {error}",
                    path=event.path,
                    sources=list(event.sources),
                    file=error.path,
                    line=error.line,
                    key=error.key,
                    problem=error.problem,
                    suggestion=error.suggestion,
                )
        except Exception:
            log.exception("limenex: audit sink failed for a reload of %s", event.path)

    def _refused_resume(self, request: ApprovalRequest | None, refusal: ApprovalRefused) -> None:
        """Audit a refused resume of a known request (``refused``, with ``why``)."""
        hook = self.audit_logger
        if request is None or not isinstance(hook, AuditLog | BufferedAuditLog):
            return
        try:
            hook.write_request("refused", request, why=refusal.why)
        except Exception:
            log.exception("limenex: audit sink failed for a refused resume of %s", request.id)

    def _resumable(
        self, request_id: str, request: ApprovalRequest | None
    ) -> tuple[ApprovalRequest, dict[str, Any], Action]:
        if request is None or request.status is not ApprovalStatus.APPROVED:
            raise refused(request_id, None if request is None else request.status, "resume")
        build = self._actions.get((request.skill_id, request.action))
        if build is None:
            named = f" named {request.action!r}" if request.action else ""
            raise LimenexConfigError(
                f"cannot resume approval request {request_id!r}: no executor{named} for skill "
                f"{request.skill_id!r} is registered with this engine; make the skill "
                "(e.g. make_spend(engine, registry) or @engine.governed) before resuming"
            )
        params = request.call_params()
        if (
            fingerprint(request.skill_id, request.agent_id, params, request.action)
            != request.fingerprint
        ):
            raise ApprovalRefused(
                f"cannot resume approval request {request_id!r}: its kept params no longer "
                "match its fingerprint (the stored request was changed, or made by an "
                "earlier version of Limenex)",
                request_id=request_id,
                why="fingerprint",
            )
        self._same_policies(request, self.skill(request.skill_id))
        return request, params, build(params)

    def _same_policies(self, request: ApprovalRequest, skill: CompiledSkill) -> None:
        """Refuse a resume whose skill's policies changed since the request was made."""
        if request.policies_digest != self._policies_digest(skill):
            raise ApprovalRefused(
                f"cannot resume approval request {request.id!r}: the policies of "
                f"{request.skill_id!r} changed since it was made, so what the human approved "
                "is not what would be waived now; the call must be escalated again",
                request_id=request.id,
                why="policies",
            )

    def _policies_digest(self, skill: CompiledSkill) -> str:
        """SHA-256 of the canonical JSON of the skill's policies, as they are now."""
        cached = self._digests.get(skill.skill_id)
        if cached is not None and cached[0] is skill:
            return cached[1]
        digest = policies_digest(skill.policies)
        self._digests[skill.skill_id] = (skill, digest)
        return digest

    def _await_elsewhere(self, awaitable: Any) -> Any:
        """Run ``awaitable`` to its end on the helper loop thread, from synchronous code.

        It runs in a copy of the caller's context (``call_soon_threadsafe`` takes it along),
        so context variables the caller set (a framework's config, a request key) are seen.
        Used by :meth:`resume_sync` for an async executor, and by integrations whose sync
        tools call async skills: on the engine's one helper loop, a store's per-loop
        connections are made once.
        """
        loop = self._background_loop()
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), loop).result()

    def close(self) -> None:
        """Stop helper threads, flush the audit log, close the stores.

        The default audit log is closed; one you passed is flushed and left open.
        """
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()
        with self._loop_lock:
            thread, self._loop_thread = self._loop_thread, None
        if thread is not None:
            try:  # the store's connections made on the helper loop are closed on it
                asyncio.run_coroutine_threadsafe(self.state_store.aclose(), thread.loop).result(
                    timeout=10
                )
            except Exception:
                log.warning("limenex: closing the state store on its helper loop failed")
            thread.stop()
        try:
            audit = self.audit_logger
            if self._owns_audit and isinstance(audit, BufferedAuditLog):
                audit.close()
            elif isinstance(audit, BufferedAuditLog):
                audit.flush()  # yours to close: other engines may share it
        finally:
            if self._approval_store is not None:
                self._approval_store.close()
            self.state_store.close()

    # --- planning ---------------------------------------------------------------------------

    def skill(self, skill_id: str) -> CompiledSkill:
        """The compiled policies of ``skill_id``; refuses a skill without an entry."""
        try:
            source = self.policy_store.get(skill_id)
        except (LimenexConfigError, GovernanceSignal):
            raise
        except Exception as exc:
            raise BlockedError(_failure_decision(skill_id, "", "the policy store", exc)) from exc
        if source is None:
            raise UnregisteredSkillError(
                f"skill {skill_id!r} has no entry in the policy file, so it is refused "
                "(add it, with `policies: []` to govern it without rules)",
                decision=Decision(
                    Verdict.BLOCK, skill_id, "", f"{skill_id}: unregistered skill.", None
                ),
            )
        compiled = self._compiled.get(skill_id)
        if compiled is None or compiled.source is not source:
            compiled = compile_skill(skill_id, source)
            self._compiled[skill_id] = compiled
        return compiled

    def _plan(
        self,
        skill_id: str,
        agent_id: object,
        params: Mapping[str, Any],
        approval: ApprovalRequest | None = None,
        *,
        now: float | None = None,
    ) -> Plan:
        try:
            if type(agent_id) is not str or not agent_id:
                check_agent_id(agent_id)  # raises, naming the argument
            skill = self.skill(skill_id)
            if approval is not None:  # the policies this plan reads are those approved
                self._same_policies(approval, skill)
            return plan_call(
                skill,
                agent_id,  # type: ignore[arg-type]
                params,
                waive=None if approval is None else _waived(approval),
                now=(self.clock.now() if now is None else now) if skill.timed else 0.0,
            )
        except InvalidArgumentError as exc:
            if exc.decision is None:
                exc.decision = Decision(
                    Verdict.BLOCK,
                    skill_id,
                    agent_id if isinstance(agent_id, str) else "",
                    f"{skill_id}: refused before evaluation: {exc}.",
                )
            raise
        except (LimenexConfigError, GovernanceSignal):
            raise
        except Exception as exc:  # a bug must not become an ALLOW
            raise BlockedError(
                _failure_decision(skill_id, str(agent_id), "policy evaluation", exc)
            ) from exc

    def _check_signature(
        self, skill_id: str, fn: Callable[..., Any], signature: inspect.Signature
    ) -> None:
        """Fail at decoration time when a loaded policy reads an argument ``fn`` lacks."""
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            return
        try:
            skill = self.skill(skill_id)
        except (UnregisteredSkillError, BlockedError):
            return  # refused at call time (the policy file may gain the skill later)
        missing = sorted(skill.referenced_params() - set(signature.parameters))
        if missing:
            raise LimenexConfigError(
                f"@governed({skill_id!r}): policies read {', '.join(map(repr, missing))} "
                f"but {fn.__qualname__} has no such parameter"
            )

    # --- semantic rules ---------------------------------------------------------------------

    def _shadow_before(self, plan: Plan, position: int) -> None:
        """Judge the shadow checks before the one the store refused (it sent no totals).

        A second round trip, only on a refused call with a shadow check before the refusal.
        The call is refused either way: a failure here loses the shadow entry, nothing more.
        """
        try:
            totals = self.state_store.peek(plan.checks[:position], self.clock.now())
            shadow_state(plan, totals, position)
        except Exception:
            log.exception("limenex: reading totals for the shadow policies failed")

    async def _ashadow_before(self, plan: Plan, position: int) -> None:
        try:
            totals = await self.state_store.apeek(plan.checks[:position], self.clock.now())
            shadow_state(plan, totals, position)
        except Exception:
            log.exception("limenex: reading totals for the shadow policies failed")

    def _decide_by_totals(self, plan: Plan, totals: tuple[Decimal, ...]) -> Decision | None:
        """The first breach among the planned checks given these totals, else the plan's own.

        Checks are planned only before the first stateless breach, so a stateful breach found
        here always comes first. Arithmetic trouble fails closed.
        """
        try:
            breach = first_state_breach(plan.checks, totals)
            if plan.shadow_checks:
                shadow_state(plan, totals, None if breach is None else breach.position)
        except ArithmeticError as exc:
            return self._failure(plan.skill.skill_id, plan.agent_id, "exact arithmetic", exc)
        return plan.breach if breach is None else state_decision(plan, breach)

    async def _judge(self, plan: Plan, decision: Decision | None) -> Decision | None:
        """Ask the semantic rules that precede ``decision``'s policy, in order."""
        if decision is not None and decision.policy_index is None:
            return decision  # a fail-closed BLOCK: no model is asked
        limit = len(plan.skill.steps) if decision is None else decision.policy_index
        for step in plan.semantic:
            if limit is not None and step.index >= limit:
                break
            why = await self._ask(plan, step.index, step.policy.rule)
            if why is not None:
                if step.shadow:  # audited, never enforced
                    plan.add_shadow(semantic_decision(plan, step, why))
                    continue
                return semantic_decision(plan, step, why)
        return decision

    def _judge_sync(self, plan: Plan, decision: Decision | None) -> Decision | None:
        if not plan.semantic:
            return decision
        try:
            loop = self._background_loop()
            future: Future[Decision | None] = asyncio.run_coroutine_threadsafe(
                self._judge(plan, decision), loop
            )
            return future.result()
        except Exception as exc:  # the evaluator's loop thread itself broke
            return self._failure(plan.skill.skill_id, plan.agent_id, "semantic evaluation", exc)

    async def _ask(self, plan: Plan, index: int, rule: str) -> str | None:
        """``None`` when the evaluator allows; otherwise why the rule counts as breached.

        What was asked and answered goes to ``plan.judgements`` for the audit records.
        """
        entry: dict[str, Any] = {"policy_index": index, "rule": rule}
        if plan.judgements is None:
            plan.judgements = []
        plan.judgements.append(entry)
        evaluator = self.llm_evaluator
        if evaluator is None:
            entry["error"] = "no llm_evaluator is configured"
            return "no llm_evaluator is configured, so the rule cannot be checked"
        timeout = self.semantic_timeout
        asked = perf_counter()
        try:
            intent = Intent(plan.skill.skill_id, plan.agent_id, plan.params)
            async with asyncio.timeout(timeout) as deadline:
                if _is_async_callable(evaluator):
                    answer = evaluator(intent, rule)
                else:
                    answer = await asyncio.to_thread(evaluator, intent, rule)
                if inspect.isawaitable(answer):
                    answer = await answer
            if deadline.expired():  # an evaluator that swallowed its cancellation
                raise TimeoutError
            verdict, reason = parse_answer(answer)
        except TimeoutError as exc:
            failure: Exception = exc
            why = f"the evaluator did not answer within {timeout:g} s"
        except EvaluatorError as exc:
            failure, why = exc, str(exc)
        except Exception as exc:
            failure, why = exc, f"the evaluator failed: {type(exc).__name__}: {exc}"
        else:
            if isinstance(answer, Judgement):
                entry.update(answer.details())
                _cap_raw(entry)
            else:
                entry.update(verdict=verdict.value, reason=reason)
            entry.setdefault("latency_ms", round((perf_counter() - asked) * 1000, 3))
            if verdict is Verdict.ALLOW:
                return None
            return reason or f"the evaluator answered {verdict.value}"
        entry["error"] = why
        for name in ("model", "raw", "latency_ms"):
            found = getattr(failure, name, None)
            if found is not None:
                entry[name] = found
        _cap_raw(entry)
        entry.setdefault("latency_ms", round((perf_counter() - asked) * 1000, 3))
        return why

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread()
            return self._loop_thread.loop

    # --- state settlement -------------------------------------------------------------------

    async def _areserve(self, plan: Plan) -> Reservation | StateBreach:
        store = self.state_store
        now = self.clock.now()
        if self._store_is_direct:
            return store.reserve(plan.checks, now)
        reserve = store.areserve(plan.checks, now)
        try:
            suspended_on = reserve.send(None)  # run it eagerly, up to its first suspension
        except StopIteration as done:  # finished without suspending (SQLite's uncontended path)
            return cast(Reservation | StateBreach, done.value)
        task = asyncio.ensure_future(_resumed(reserve, suspended_on))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The store may still reserve after we were cancelled: undo it when it lands.
            task.add_done_callback(self._release_orphan)
            raise

    def _release_orphan(self, task: asyncio.Future[Reservation | StateBreach]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        outcome = task.result()
        if type(outcome) is Reservation:
            # On the loop, through the async release: a sync one could block the loop for the
            # store's whole timeout. Held in a set so the task is not collected mid-way.
            release = asyncio.ensure_future(self._asettle(outcome, release=True))
            self._orphans.add(release)
            release.add_done_callback(self._orphans.discard)

    async def _asettle(self, reservation: Reservation | None, *, release: bool) -> None:
        if reservation is None:
            return
        if self._store_is_direct:
            self._settle(reservation, release=release)
            return
        store = self.state_store
        try:
            if release:
                await store.arelease(reservation, self.clock.now())
            else:
                await store.acommit(reservation)
        except Exception:
            log.exception("limenex: settling %s failed; the amount stays counted", reservation)

    def _settle(self, reservation: Reservation | None, *, release: bool) -> None:
        """Commit or release; a failure leaves the amount counted (the safe side) and is logged."""
        if reservation is None:
            return
        try:
            if release:
                self.state_store.release(reservation, self.clock.now())
            else:
                self.state_store.commit(reservation)
        except Exception:
            log.exception("limenex: settling %s failed; the amount stays counted", reservation)

    # --- verdicts and audit -----------------------------------------------------------------

    def _refuse(
        self,
        plan: Plan,
        decision: Decision,
        started: float | None,
        approval: ApprovalRequest | None = None,
    ) -> NoReturn:
        extra = {} if approval is None else {"request_id": approval.id}
        self._audit(
            "blocked",
            decision,
            plan.params,
            fail_closed=False,
            started=started,
            **extra,
            **_judged(plan),
        )
        raise BlockedError(decision)

    def _new_request(
        self,
        plan: Plan,
        decision: Decision,
        action_name: str,
        resumed: ApprovalRequest | None,
    ) -> ApprovalRequest:
        try:
            return request_from_decision(
                decision,
                plan.params,
                now=self.clock.now(),
                ttl=self.approval_ttl,
                action=action_name,
                waived=() if resumed is None else tuple(_waived(resumed)),
                policies_digest=self._policies_digest(plan.skill),
            )
        except Exception as exc:
            raise self._fail(plan, "keeping the approval request", exc) from exc

    def _escalated(
        self,
        plan: Plan,
        decision: Decision,
        request: ApprovalRequest,
        started: float | None,
        resumed: ApprovalRequest | None,
    ) -> EscalationRequired:
        extra = {} if resumed is None else {"supersedes": resumed.id}
        self._audit(
            "escalated",
            decision,
            plan.params,
            fail_closed=False,
            started=started,
            request_id=request.id,
            **extra,
            **_judged(plan),
        )
        return EscalationRequired(decision, request.id)

    def _escalate(
        self,
        plan: Plan,
        decision: Decision,
        started: float | None,
        action_name: str,
        resumed: ApprovalRequest | None,
    ) -> NoReturn:
        request = self._new_request(plan, decision, action_name, resumed)
        store = self.approval_store
        try:
            store.create(request)
        except Exception as exc:
            raise self._fail(plan, "the approval store", exc) from exc
        if resumed is not None:  # carried into the new request, which waives it too
            try:
                store.consume(resumed.id, resumed.fingerprint, self.clock.now())
            except BaseException:
                with contextlib.suppress(Exception):  # it carries nothing: never approvable
                    store.deny(request.id, _SUPERSEDED, self.clock.now(), _UNCARRIED)
                raise
        signal = self._escalated(plan, decision, request, started, resumed)
        notify = self.on_escalation
        if notify is not None:
            try:
                if _is_async_callable(notify):
                    loop = self._background_loop()
                    asyncio.run_coroutine_threadsafe(_notified(notify, request), loop).result()
                else:
                    _check_notified(notify(request))
            except Exception:
                log.exception("limenex: on_escalation failed for request %s", request.id)
        raise signal

    async def _aescalate(
        self,
        plan: Plan,
        decision: Decision,
        started: float | None,
        action_name: str,
        resumed: ApprovalRequest | None,
    ) -> NoReturn:
        request = self._new_request(plan, decision, action_name, resumed)
        store = self.approval_store
        try:
            await store.acreate(request)
        except Exception as exc:
            raise self._fail(plan, "the approval store", exc) from exc
        if resumed is not None:  # carried into the new request, which waives it too
            try:
                await store.aconsume(resumed.id, resumed.fingerprint, self.clock.now())
            except BaseException:
                with contextlib.suppress(Exception):  # it carries nothing: never approvable
                    await store.adeny(request.id, _SUPERSEDED, self.clock.now(), _UNCARRIED)
                raise
        signal = self._escalated(plan, decision, request, started, resumed)
        notify = self.on_escalation
        if notify is not None:
            try:
                await _notified(notify, request)
            except Exception:
                log.exception("limenex: on_escalation failed for request %s", request.id)
        raise signal

    def _resumed(self, plan: Plan, request: ApprovalRequest, started: float | None) -> None:
        self._audit(
            "resumed",
            allow_decision(plan),
            plan.params,
            fail_closed=False,
            started=started,
            request_id=request.id,
            approved_by=request.decided_by,
            **_judged(plan),
        )

    def _admit(
        self, plan: Plan, reservation: Reservation | None, started: float | None
    ) -> Decision | None:
        """Let the action run, or BLOCK it (releasing ``reservation``) when the audit fails.

        The buffered log only needs to admit the call: its outcome record carries the ALLOW.
        Other hooks get an ``allowed`` record, which is returned for the outcome's.
        """
        if plan.shadow:  # the span of the call says what shadow policies would have decided
            first = plan.shadow_breaches()[0]
            _telemetry.note_shadow(first.verdict.value, (first.policy_index or 0) + 1)
        buffer = self._buffer
        if buffer is not None:
            if not buffer.admits():
                self._before_action(plan, reservation, started)  # raises the BLOCK
            return None
        if self.audit_logger is None:
            return None
        return self._before_action(plan, reservation, started)

    def _before_action(
        self, plan: Plan, reservation: Reservation | None, started: float | None
    ) -> Decision:
        allowed = allow_decision(plan)
        try:
            self._audit(
                "allowed", allowed, plan.params, fail_closed=True, started=started, **_judged(plan)
            )
        except BlockedError:
            self._settle(reservation, release=True)
            raise
        return allowed

    def _after_action(
        self,
        plan: Plan,
        event: str,
        allowed: Decision | None,
        started: float | None,
        reservation: Reservation | None,
    ) -> None:
        """Record an allowed call's outcome (``executed`` or ``failed``); never raises."""
        buffer = self._buffer
        if buffer is None and allowed is None:
            return  # no audit
        state = (
            None if reservation is None else (plan.checks, reservation.observed, plan.skill.steps)
        )
        if buffer is not None:
            buffer.outcome(
                event,
                plan.skill.skill_id,
                plan.agent_id,
                plan.params,
                started,
                state,
                _judged(plan),
            )
        elif allowed is not None:
            extra = {"state": state} if state is not None else {}
            self._audit(
                event,
                allowed,
                plan.params,
                fail_closed=False,
                started=started,
                **extra,
                **_judged(plan),
            )

    def _audit(
        self,
        event: str,
        decision: Decision,
        params: Mapping[str, Any],
        *,
        fail_closed: bool,
        **extra: Any,
    ) -> None:
        hook = self.audit_logger
        if hook is None:
            return
        try:
            if self._rich_audit:
                hook(event, decision, params, **extra)
            else:
                hook(event, decision, params)
        except Exception as exc:
            if fail_closed:
                blocked = _failure_decision(
                    decision.skill_id, decision.agent_id, "the audit sink", exc
                )
                if self._buffer is not None:  # kept in its queue until the log recovers
                    with contextlib.suppress(Exception):
                        self._buffer("blocked", blocked, params)
                raise BlockedError(blocked) from exc
            log.exception("limenex: audit sink failed for %s event", event)

    def _fail(self, plan: Plan, what: str, exc: BaseException) -> BlockedError:
        decision = self._failure(plan.skill.skill_id, plan.agent_id, what, exc)
        self._audit("blocked", decision, plan.params, fail_closed=False, **_judged(plan))
        return BlockedError(decision)

    @staticmethod
    def _failure(skill_id: str, agent_id: str, what: str, exc: BaseException) -> Decision:
        return _failure_decision(skill_id, agent_id, what, exc)


def _weak_listener(engine: PolicyEngine) -> Callable[[PolicyReload], None]:
    ref = weakref.ref(engine)

    def on_reload(event: PolicyReload) -> None:
        alive = ref()
        if alive is not None:
            alive._policies_reloaded(event)

    return on_reload


_RAW_KEPT = 8192
"""Characters of a model's raw answer an audit record keeps (a model may answer at length)."""


def _cap_raw(entry: dict[str, Any]) -> None:
    raw = entry.get("raw")
    if isinstance(raw, str) and len(raw) > _RAW_KEPT:
        entry["raw"] = f"{raw[:_RAW_KEPT]}…[{len(raw) - _RAW_KEPT} more characters]"


_NOT_JUDGED: dict[str, Any] = {}  # never written to: only ever unpacked or read


def _judged(plan: Plan) -> dict[str, Any]:
    """The audit's ``semantic`` entry (what each semantic rule asked was answered) and
    ``shadow`` entry (what shadow-mode policies would have decided)."""
    judgements = plan.judgements
    if plan.shadow is None:
        return _NOT_JUDGED if judgements is None else {"semantic": judgements}
    breaches = plan.shadow_breaches()
    extra: dict[str, Any] = {
        "shadow": {
            "verdict": breaches[0].verdict.value,
            "policy_index": breaches[0].policy_index,
            "breaches": [
                {"policy_index": d.policy_index, "verdict": d.verdict.value, "reason": d.reason}
                for d in breaches
            ],
        }
    }
    if judgements is not None:
        extra["semantic"] = judgements
    return extra


def _with_shadow(plan: Plan, decision: Decision) -> Decision:
    """``decision`` carrying what the plan's shadow policies would have decided.

    Only shadow breaches before the deciding policy count (with them enforced, a later one
    would not have been reached); the plan keeps only those too, for the audit record.
    """
    if plan.shadow is None:
        return decision
    decided = decision.policy_index
    if decided is not None:
        earlier = [
            d for d in plan.shadow if d.policy_index is not None and d.policy_index < decided
        ]
        plan.shadow = earlier or None
        if not earlier:
            return decision
    return decision.with_shadow(plan.shadow_breaches())


class _Yield:
    """An awaitable that yields one value to the event loop and returns what is sent back."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


async def _resumed(coro: Coroutine[Any, Any, R], suspended_on: Any) -> R:
    """Go on driving ``coro`` from the suspension its first step stopped at, as ``await`` would.

    The engine starts a store's ``areserve`` eagerly: when it finishes without suspending, no
    task and no trip through the event loop are needed. When it suspends, this hands the rest
    to a task (so it can be shielded from cancellation), passing every value and exception
    between the task and ``coro`` unchanged, like ``yield from``.
    """
    while True:
        try:
            sent = await _Yield(suspended_on)
        except BaseException as exc:  # every exception goes on to the coroutine
            try:
                suspended_on = coro.throw(exc)
            except StopIteration as done:
                return cast(R, done.value)
        else:
            try:
                suspended_on = coro.send(sent)
            except StopIteration as done:
                return cast(R, done.value)


async def _notified(notify: Callable[[ApprovalRequest], Any], request: ApprovalRequest) -> None:
    """Tell ``notify`` about ``request``: sync ones on a worker thread; 10 s at most."""
    async with asyncio.timeout(_NOTIFY_TIMEOUT):
        if _is_async_callable(notify):
            answer = notify(request)
        else:
            answer = await asyncio.to_thread(notify, request)
        if inspect.isawaitable(answer):
            await answer


def _inode(path: str) -> tuple[int, int] | None:
    """``(device, inode)`` of an existing file, else ``None``."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _waived(request: ApprovalRequest) -> frozenset[int]:
    """The policies a human approved ``request``'s call against: its own and those before."""
    own = () if request.policy_index is None else (request.policy_index,)
    return frozenset((*request.waived, *own))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _check_notified(answer: object) -> None:
    if inspect.iscoroutine(answer):
        answer.close()
        raise LimenexConfigError("on_escalation returned a coroutine: make it `async def`")


_NOTIFY_TIMEOUT = 10.0
_SUPERSEDED = "limenex"
_UNCARRIED = "the approval it was to carry could not be used (another resume used it first)"


def _default_audit_log(state_store: StateStore) -> BufferedAuditLog:
    """A buffered JSONL audit log at :func:`limenex.audit.path_for` the state store."""
    return BufferedAuditLog(
        AuditLog(JsonlSink(audit_path_for(state_store)), redact=redact_from_env())
    )


def _action_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of a function, or of the class of a callable object."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


def _rebuilder(fn: Callable[..., Any], signature: inspect.Signature) -> ActionBuilder:
    """``params -> action`` calling ``fn`` with the params a governed call bound.

    The params are the call's bound arguments (defaults applied, ``**kwargs`` flattened), so
    the call is rebuilt in signature order: every parameter before a ``*args`` positionally,
    the ``*args`` items after them, keyword-only ones and the flattened rest by keyword.
    """
    kinds = inspect.Parameter
    parameters = list(signature.parameters.values())
    star = next((i for i, p in enumerate(parameters) if p.kind is kinds.VAR_POSITIONAL), None)
    by_position = [
        p.name
        for i, p in enumerate(parameters)
        if p.kind is kinds.POSITIONAL_ONLY
        or (star is not None and i < star and p.kind is kinds.POSITIONAL_OR_KEYWORD)
    ]
    star_name = None if star is None else parameters[star].name

    def build(params: dict[str, Any]) -> Action:
        kwargs = dict(params)
        args = [kwargs.pop(name) for name in by_position]
        if star_name is not None:
            args.extend(kwargs.pop(star_name, ()))
        bound = signature.bind(*args, **kwargs)  # a TypeError here: before any approval is used
        return lambda: fn(*bound.args, **bound.kwargs)

    return build


def _default_state_store(policy_store: PolicyStore) -> StateStore:
    """SQLite beside the policy file (``.limenex/state.db`` for other policy stores)."""
    from limenex.core.stores import SQLiteStateStore

    if isinstance(policy_store, LocalFilePolicyStore):
        return SQLiteStateStore(policy_store.path.parent / "state.db")
    return SQLiteStateStore(os.path.join(".limenex", "state.db"))


def _failure_decision(skill_id: str, agent_id: str, what: str, exc: BaseException) -> Decision:
    return Decision(
        Verdict.BLOCK,
        skill_id,
        agent_id,
        f"{skill_id}: blocked because {what} failed ({type(exc).__name__}: {exc}).",
        fail_closed=True,
    )


def _binder(
    skill_id: str, signature: inspect.Signature, agent_id_param: str
) -> Callable[[tuple[Any, ...], dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """``(args, kwargs) -> (agent_id, params)`` for calls of a governed function.

    Keyword-only calls (how agents call tools) take a fast path; anything else goes through
    ``Signature.bind``, whose errors become :class:`InvalidArgumentError`.
    """
    parameters = signature.parameters.values()
    plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    simple = all(p.kind in plain for p in parameters)
    names = frozenset(p.name for p in parameters)
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    required = names - defaults.keys()
    var_keyword = [p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]

    def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if simple and not args and required <= kwargs.keys() <= names:
            params = {**defaults, **kwargs} if defaults else kwargs
            return params[agent_id_param], params
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgumentError(
                f"{skill_id}: {exc}", argument=_argument_in(str(exc))
            ) from None
        bound.apply_defaults()
        params = dict(bound.arguments)
        for name in var_keyword:
            extra = params.pop(name)
            clash = sorted(extra.keys() & params.keys())
            if clash:  # e.g. f(amount, /, **kw) called f(1_000_000, amount=1): never two values
                raise InvalidArgumentError(
                    f"{skill_id}: argument {clash[0]!r} is given twice (once positionally, once"
                    " by keyword): the policies could not tell which one the function uses",
                    argument=clash[0],
                )
            params.update(extra)
        return params[agent_id_param], params

    return bind


def _is_async_callable(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - we need the bound __call__, not callable()
    )


def _argument_in(message: str) -> str:
    """The argument name in a ``Signature.bind`` TypeError, else ``"arguments"``."""
    start = message.find("'")
    end = message.find("'", start + 1)
    return message[start + 1 : end] if 0 <= start < end else "arguments"


class _LoopThread:
    """One event loop on a daemon thread, for async evaluators called from sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="limenex-evaluator-loop", daemon=True)
        self._thread.start()
        ready.wait()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()
