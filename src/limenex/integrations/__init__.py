"""Governance inside agent frameworks: what every integration shares.

An integration turns governed callables (what the skill factories return, and
``@engine.governed`` functions) into the framework's tools. Every tool call goes through
:func:`call`, which gives an :class:`Outcome`: ALLOW with the executor's result, BLOCK with
a refusal the model can read, or ESCALATE with the pending approval request. A human's
answer to an escalation goes through :func:`decide`, which approves and resumes (the
action runs once) or denies.

Frameworks that run a tool again when they resume it (LangGraph re-runs the node after an
``interrupt``) pass a ``key`` naming the tool call: the escalation's request id is derived
from it (:func:`~limenex.approvals.request.request_key`), so the second run finds the
request the first one made, and never escalates twice.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from limenex.approvals.request import (
    ApprovalRefused,
    ApprovalRequest,
    ApprovalStatus,
    canonical_params,
    request_id_for,
    request_key,
)
from limenex.core.decision import Verdict
from limenex.core.errors import BlockedError, EscalationRequired, InvalidArgumentError
from limenex.core.handle import SkillHandle, handle_of

__all__ = [
    "Outcome",
    "SkillHandle",
    "call",
    "decide",
    "handle_of",
    "read_answer",
    "tool_name",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What a governed tool call came to.

    ``verdict`` is ALLOW when the action ran (``result`` is what it returned), BLOCK when it
    was refused (``reason`` says why: a policy, a denial, a used or expired approval), and
    ESCALATE when it waits for a human (``request`` is the pending request).
    """

    verdict: Verdict
    result: Any = None
    reason: str = ""
    request: ApprovalRequest | None = None

    @property
    def request_id(self) -> str | None:
        return None if self.request is None else self.request.id

    def refusal(self) -> str:
        """The text a model reads when the action did not run."""
        if self.verdict is Verdict.ALLOW:
            raise ValueError("an allowed call has no refusal")
        text = f"{self.verdict.value}: {self.reason}"
        if self.request is not None:
            text += f" (approval request {self.request.id})"
        return text

    def interrupt_payload(self) -> dict[str, Any]:
        """What a human is shown for an ESCALATE: JSON data."""
        request = self.request
        if self.verdict is not Verdict.ESCALATE or request is None:
            raise ValueError("only an ESCALATE outcome waits for a human")
        return {
            "verdict": "ESCALATE",
            "request_id": request.id,
            "skill": request.skill_id,
            "agent_id": request.agent_id,
            "params": request.params,
            "reason": request.reason,
            "expires_at": request.expires_at,
        }


def tool_name(skill_id: str) -> str:
    """A skill id as a tool name: ``finance.spend`` -> ``finance_spend``."""
    return skill_id.replace(".", "_")


async def call(
    handle: SkillHandle, agent_id: str, arguments: Mapping[str, Any], *, key: str | None = None
) -> Outcome:
    """Govern one tool call; never raises for a refusal (bad arguments still raise).

    With ``key``, a request already made under it is picked up where it was left: pending
    or approved, the call waits for a human again (ESCALATE) instead of being evaluated anew;
    denied, expired or used, it is refused.
    """
    arguments = dict(arguments)
    if handle.agent_id_param in arguments:
        raise InvalidArgumentError(
            f"{handle.skill_id}: the agent id is set by the integration, not by the model",
            argument=handle.agent_id_param,
        )
    if key is not None:
        found = await handle.engine.approvals.get(request_id_for(key))
        if found is not None:
            if not _same_call(handle, agent_id, arguments, found):
                return Outcome(
                    Verdict.BLOCK,
                    reason=(
                        f"this tool call's id was already used by another call (approval "
                        f"request {found.id}, for other arguments); the call did not run"
                    ),
                )
            return _outcome_of(found)
        with request_key(key):
            return await _governed(handle, agent_id, arguments)
    return await _governed(handle, agent_id, arguments)


async def decide(
    handle: SkillHandle,
    request_id: str,
    answer: Mapping[str, Any],
    *,
    next_key: str | None = None,
) -> Outcome:
    """Act on a human's ``answer`` (see :func:`read_answer`) to request ``request_id``.

    On approve, the request is approved (unless it already is) and resumed: the action runs
    at most once, and every BLOCK policy still applies. A further ESCALATE breached on resume
    gives an ESCALATE outcome with the new request, keyed by ``next_key``. On deny, or when
    the request cannot be approved (denied, expired or used), the outcome is a BLOCK.
    """
    approve, approver, note = read_answer(answer)
    approvals = handle.engine.approvals
    try:
        if not approve:
            request = await approvals.deny(request_id, approver=approver, note=note)
            return Outcome(Verdict.BLOCK, reason=_denied(request), request=request)
        found = await approvals.get(request_id)
        if found is None or found.status is not ApprovalStatus.APPROVED:
            await approvals.approve(request_id, approver=approver, note=note)
        if next_key is None:
            result = await handle.engine.resume(request_id)
        else:
            with request_key(next_key):
                result = await handle.engine.resume(request_id)
    except ApprovalRefused as refused:
        return Outcome(Verdict.BLOCK, reason=str(refused))
    except BlockedError as blocked:
        return Outcome(Verdict.BLOCK, reason=blocked.decision.reason)
    except EscalationRequired as again:
        return await _escalated(handle, again)
    return Outcome(Verdict.ALLOW, result=result)


def read_answer(answer: Mapping[str, Any]) -> tuple[bool, str, str | None]:
    """``{"decision": "approve"|"deny", "approver": NAME, "note": TEXT?}`` -> its parts."""
    if not isinstance(answer, Mapping):
        raise InvalidArgumentError(
            "a human's answer must be a mapping like "
            '{"decision": "approve", "approver": "alice", "note": "ok"}, '
            f"got {type(answer).__name__}",
            argument="answer",
        )
    unknown = sorted(set(answer) - {"decision", "approver", "note"})
    if unknown:
        raise InvalidArgumentError(
            f"the answer has unknown keys {unknown}; it takes decision, approver and note",
            argument=str(unknown[0]),
        )
    decision = answer.get("decision")
    if decision not in ("approve", "deny"):
        raise InvalidArgumentError(
            f"answer 'decision' must be 'approve' or 'deny', got {decision!r}",
            argument="decision",
        )
    approver = answer.get("approver")
    if not isinstance(approver, str) or not approver.strip():
        raise InvalidArgumentError(
            "answer 'approver' must name the human who decided", argument="approver"
        )
    note = answer.get("note")
    if note is not None and not isinstance(note, str):
        raise InvalidArgumentError("answer 'note' must be a string", argument="note")
    return decision == "approve", approver, note


async def _governed(handle: SkillHandle, agent_id: str, arguments: dict[str, Any]) -> Outcome:
    try:
        result = await handle.call(agent_id, arguments)
    except BlockedError as blocked:
        return Outcome(Verdict.BLOCK, reason=blocked.decision.reason)
    except EscalationRequired as escalation:
        return await _escalated(handle, escalation)
    return Outcome(Verdict.ALLOW, result=result)


async def _escalated(handle: SkillHandle, escalation: EscalationRequired) -> Outcome:
    request_id = escalation.request_id
    request = None if request_id is None else await handle.engine.approvals.get(request_id)
    if request is None:  # kept, then gone: nothing a human could approve
        return Outcome(Verdict.BLOCK, reason=escalation.decision.reason)
    return _outcome_of(request)


def _outcome_of(request: ApprovalRequest) -> Outcome:
    status = request.status
    if status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED):
        return Outcome(Verdict.ESCALATE, reason=request.reason, request=request)
    if status is ApprovalStatus.DENIED:
        return Outcome(Verdict.BLOCK, reason=_denied(request), request=request)
    return Outcome(
        Verdict.BLOCK,
        reason=f"approval request {request.id} is {status.value}; the action did not run",
        request=request,
    )


def _same_call(
    handle: SkillHandle, agent_id: str, arguments: Mapping[str, Any], request: ApprovalRequest
) -> bool:
    """Whether ``request`` was made for this very call: skill, agent and every argument.

    A key names one tool call, but the model chooses tool call ids: one reused for other
    arguments must never pick up (and get approved) the request of the first call. A param
    the call leaves out must be one the skill fills in: the agent, or a default.
    """
    if request.skill_id != handle.skill_id or request.agent_id != agent_id:
        return False
    stored = request.params
    try:
        given = canonical_params(arguments)
    except Exception:
        return False
    if any(name not in stored or stored[name] != value for name, value in given.items()):
        return False
    parameters = handle.signature.parameters
    for name, value in stored.items():
        if name in given or name == handle.agent_id_param:
            continue
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        if default is inspect.Parameter.empty:
            return False
        try:
            if canonical_params({name: default})[name] != value:
                return False
        except Exception:
            return False
    return True


def _denied(request: ApprovalRequest) -> str:
    note = f": {request.note}" if request.note else ""
    return f"a human ({request.decided_by}) denied the action{note}"
