"""Governed function tools for the OpenAI Agents SDK (``pip install 'limenex[openai-agents]'``).

:func:`governed_function_tools` turns skills (what ``make_spend()``/``make_send()``/...
return, and ``@engine.governed`` functions, sync or async) into the SDK's ``FunctionTool``\\ s.
Each tool is named after its skill id (``finance.spend`` -> ``finance_spend``), described by
the skill's docstring, and takes a strict JSON schema of the skill's parameters *without*
the agent id: the agent is fixed when the tools are made, so a model can never act as
another agent (an ``agent_id`` argument is refused like any unknown one).

Every call goes through the policy engine:

* **ALLOW**: the executor runs; its result is the tool output.
* **BLOCK**: nothing runs; the model reads ``"BLOCK: <reason>"`` and the run goes on.
* **ESCALATE** becomes the SDK's human-in-the-loop tool approval. Before a call runs, its
  ``needs_approval`` asks the engine for a *dry run* (:meth:`PolicyEngine.evaluate
  <limenex.core.engine.PolicyEngine.evaluate>`: no state change, no executor); on ESCALATE
  the run pauses with a ``ToolApprovalItem`` in ``result.interruptions``
  (:func:`review` tells a human what the engine says about it). Then:

  - ``state.approve(item)`` and ``Runner.run(agent, state)``: the tool runs the call
    through the engine under a key made from the SDK's tool call id
    (:func:`~limenex.approvals.request.request_key`). The engine escalates, keeping an
    approval request; since a human approved this very call in the SDK, the tool approves
    that request as ``approver`` and resumes it (:func:`~limenex.integrations.decide`):
    the action runs **once**, the ESCALATE policy waived for it and every BLOCK policy
    still in force. The request ends ``used``; the audit log has it ``escalated``,
    ``approved`` (by ``approver``), ``resumed`` and ``executed``. Running the approved
    state again (or a copy of it) finds the used request under the same key and is
    refused: never a second run. (Should the call be *allowed* by the time it runs, it
    simply runs and no request is made, so a replay of that state is judged anew, like a
    new call.)
  - ``state.reject(item)``: the SDK never calls the tool and the model reads the SDK's
    rejection message. The engine was never asked to make a request for the call, so there
    is none to deny: the rejection is kept by the SDK's run state, not by the engine.

  While the run is paused, the human's decision lives in the SDK's run state; the engine
  holds no request yet (making one would mean running the call, which could run the action
  if things had changed since the dry run).

  The tool asks the SDK whether a human approved the call
  (``ToolContext.is_tool_approved``); only then does it approve the engine's request. A call
  that the dry run allowed but that escalates by the time it runs (the state moved) was
  approved by nobody: it is refused with ``"ESCALATE: <reason> (approval request <id>)"``,
  and the request waits for a human (``limenex approvals approve``) and an
  ``await engine.resume(id)``. So does a further ESCALATE policy breached when an approved
  call is resumed. ``state.approve(item, always_approve=True)`` is a human's standing
  approval of the tool for the rest of the run: the SDK then runs its later calls without
  asking, and each of them that escalates is approved in the engine in ``approver``'s name
  (BLOCK policies still hold). Do not offer "always" to a human who should see every one.

The dry run is a forecast; the verdict that counts is the one given when the call runs. A
skill whose params the skill itself rewrites (the filesystem skills normalise paths) is
forecast on the model's arguments as given. Semantic policies are judged twice (forecast
and run). Requests are keyed by agent, tool and the provider's tool call id, which must be
unique (OpenAI's are): a call id seen before finds the earlier call's request.

Usage::

    from agents import Agent, Runner
    from limenex.integrations.openai_agents import governed_function_tools, review

    tools = governed_function_tools([spend], agent_id="ops-bot", approver="ana@example.com")
    agent = Agent(name="ops", instructions="Pay the bills.", tools=tools)
    result = await Runner.run(agent, "Pay the AWS bill: $250")
    while result.interruptions:
        state = result.to_state()
        for item in result.interruptions:
            print(await review(item, tools))  # verdict, skill, agent, params, reason
            if input("approve? ") == "y":
                state.approve(item)
            else:
                state.reject(item)
        result = await Runner.run(agent, state)
    print(result.final_output)
"""

from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agents import FunctionTool, RunContextWrapper, Tool, ToolApprovalItem
from agents.tool_context import ToolContext
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from limenex.approvals.request import ApprovalStatus, request_id_for
from limenex.core.decision import Verdict
from limenex.core.errors import InvalidArgumentError, LimenexConfigError
from limenex.core.handle import SkillHandle
from limenex.integrations import Outcome, call, decide, handle_of, tool_name

__all__ = [
    "Approver",
    "GovernedFunctionTool",
    "governed_function_tool",
    "governed_function_tools",
    "review",
]

log = logging.getLogger(__name__)

Approver = str | Callable[[ToolContext[Any]], str]
"""Who approved a call in the SDK: a name, or ``(tool_context) -> name`` (e.g. read from
``tool_context.context``, the app's run context)."""


class GovernedFunctionTool(FunctionTool):
    """A ``FunctionTool`` that runs a governed skill (see the module docstring).

    ``handle`` is the skill's :class:`~limenex.integrations.SkillHandle`, ``agent_id`` the
    agent every call is made for, ``arguments_model`` the pydantic model that checks the
    model's arguments.
    """

    handle: SkillHandle
    agent_id: str
    arguments_model: type[BaseModel]

    def request_key(self, call_id: str) -> str:
        """The :func:`~limenex.approvals.request.request_key` of the SDK tool call ``call_id``."""
        return _key(self.agent_id, self.name, call_id)

    def request_id(self, call_id: str) -> str:
        """The id of the engine's approval request for the tool call ``call_id``, if it
        escalated when it ran (``await engine.approvals.get(...)`` finds it)."""
        return request_id_for(self.request_key(call_id))


def governed_function_tools(
    skills: Iterable[Callable[..., Any]], *, agent_id: str, approver: Approver
) -> list[Tool]:
    """One :class:`GovernedFunctionTool` per skill, all acting for ``agent_id``.

    (Typed as the SDK's ``list[Tool]``, so that ``Agent(tools=...)`` takes it as is.)

    ``approver`` is recorded as the human who approved an escalated call when it is approved
    through the SDK (``state.approve(item)``). Two skills with one tool name are refused.
    """
    tools: list[Tool] = [
        governed_function_tool(skill, agent_id=agent_id, approver=approver) for skill in skills
    ]
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise LimenexConfigError(
                f"two skills make the tool {tool.name!r}; tool names must differ"
            )
        seen.add(tool.name)
    return tools


def governed_function_tool(
    skill: Callable[..., Any], *, agent_id: str, approver: Approver
) -> GovernedFunctionTool:
    """The :class:`GovernedFunctionTool` of one skill (see :func:`governed_function_tools`)."""
    if not isinstance(agent_id, str) or not agent_id:
        raise LimenexConfigError("agent_id must be a non-empty string")
    if not callable(approver) and (not isinstance(approver, str) or not approver.strip()):
        raise LimenexConfigError(
            "approver must name who approves in the SDK, or be (tool_context) -> name"
        )
    handle = handle_of(skill)
    name = tool_name(handle.skill_id)
    model = _arguments_model(handle, name)
    governed = _Governed(handle, agent_id, approver, model, name)
    schema = model.model_json_schema()
    schema.pop("title", None)
    tool = GovernedFunctionTool(
        name=name,
        description=_description(handle),
        params_json_schema=schema,
        on_invoke_tool=governed.invoke,
        strict_json_schema=True,
        needs_approval=governed.needs_approval,
    )
    tool.handle = handle
    tool.agent_id = agent_id
    tool.arguments_model = model
    return tool


async def review(item: ToolApprovalItem, tools: Iterable[object]) -> dict[str, Any] | None:
    """What a human deciding on ``item`` should see, or ``None`` if no governed tool made it.

    JSON data: ``verdict`` (what the engine would say now: ESCALATE, unless things changed),
    ``skill``, ``agent_id``, ``params`` (the model's arguments), ``reason`` and ``call_id``.
    Nothing runs and no state changes.
    """
    for tool in tools:
        if isinstance(tool, GovernedFunctionTool) and tool.name == item.tool_name:
            break
    else:
        return None
    raw = item.arguments or "{}"
    params: Any
    try:
        params = json.loads(raw)
    except ValueError:
        params = raw
    verdict, reason = await _forecast(tool.handle, tool.agent_id, tool.arguments_model, raw)
    call_id = getattr(item.raw_item, "call_id", None)
    return {
        "verdict": verdict,
        "skill": tool.handle.skill_id,
        "agent_id": tool.agent_id,
        "params": params,
        "reason": reason,
        "call_id": call_id if isinstance(call_id, str) else None,
    }


class _Governed:
    """The two callables the SDK calls for one tool: ``needs_approval`` and ``invoke``."""

    __slots__ = ("agent_id", "approver", "handle", "model", "name")

    def __init__(
        self,
        handle: SkillHandle,
        agent_id: str,
        approver: Approver,
        model: type[BaseModel],
        name: str,
    ) -> None:
        self.handle = handle
        self.agent_id = agent_id
        self.approver = approver
        self.model = model
        self.name = name

    def key(self, call_id: str) -> str:
        return _key(self.agent_id, self.name, call_id)

    async def needs_approval(
        self, context: RunContextWrapper[Any], params: dict[str, Any], call_id: str
    ) -> bool:
        """Pause for a human when the engine would ESCALATE this call (a dry run)."""
        try:
            found = await self.handle.engine.approvals.get(request_id_for(self.key(call_id)))
        except Exception:
            log.exception("limenex: reading the approval request of %s failed", call_id)
            found = None
        if found is not None:  # made by an earlier run of this very call
            return found.status in (ApprovalStatus.PENDING, ApprovalStatus.APPROVED)
        verdict, _ = await _forecast(self.handle, self.agent_id, self.model, params)
        return verdict == Verdict.ESCALATE.value

    async def invoke(self, context: ToolContext[Any], raw: str) -> Any:
        """Run one call through the engine; an SDK-approved ESCALATE is approved and resumed."""
        try:
            arguments = _parse(self.model, raw)
        except ValidationError as exc:
            return f"ERROR: invalid arguments for {self.name}: {_errors(exc)}"
        key = self.key(context.tool_call_id)
        try:
            outcome = await call(self.handle, self.agent_id, arguments, key=key)
            if (
                outcome.verdict is Verdict.ESCALATE
                and outcome.request is not None
                and _approved_here(context)
            ):
                approver = self.approver(context) if callable(self.approver) else self.approver
                outcome = await decide(
                    self.handle,
                    outcome.request.id,
                    {
                        "decision": "approve",
                        "approver": approver,
                        "note": f"approved in the OpenAI Agents SDK (tool call "
                        f"{context.tool_call_id})",
                    },
                    next_key=f"{key}:resumed",
                )
        except InvalidArgumentError as exc:
            return f"ERROR: {exc}"
        except Exception as exc:
            log.warning("limenex: tool %s failed", self.name, exc_info=True)
            return f"ERROR: {self.name} failed: {type(exc).__name__}: {exc}"
        return _output(self.handle, outcome)


def _key(agent_id: str, name: str, call_id: str) -> str:
    """The request key of one tool call: an escalation under it gets a fixed request id."""
    return f"openai-agents:{agent_id}:{name}:{call_id}"


def _output(handle: SkillHandle, outcome: Outcome) -> Any:
    if outcome.verdict is not Verdict.ALLOW:
        return outcome.refusal()
    if outcome.result is None:
        return f"ALLOW: {handle.skill_id} ran."
    return outcome.result


def _approved_here(context: ToolContext[Any]) -> bool:
    """Did a human approve this tool call in the SDK (``state.approve(item)``, or a standing
    ``always_approve`` of the tool)? A call the SDK ran without asking was not approved."""
    return context.is_tool_approved(context.tool_name, context.tool_call_id) is True


async def _forecast(
    handle: SkillHandle, agent_id: str, model: type[BaseModel], raw: str | Mapping[str, Any]
) -> tuple[str, str]:
    """The verdict and reason a call would get now, or ``("ERROR", why)`` for bad arguments."""
    try:
        arguments = _parse(model, raw)
        decision = await handle.engine.evaluate(
            handle.skill_id, agent_id, {**arguments, handle.agent_id_param: agent_id}
        )
    except ValidationError as exc:
        return "ERROR", f"invalid arguments: {_errors(exc)}"
    except Exception as exc:  # the call itself will meet (and report) the same failure
        return "ERROR", f"{type(exc).__name__}: {exc}"
    return decision.verdict.value, decision.reason


def _parse(model: type[BaseModel], raw: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(raw, str):
        checked = model.model_validate_json(raw or "{}")
    else:
        checked = model.model_validate(raw)
    return {name: getattr(checked, name) for name in type(checked).model_fields}


def _errors(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)
    )


def _description(handle: SkillHandle) -> str:
    doc = inspect.getdoc(inspect.unwrap(handle.fn))
    return doc or f"The governed skill {handle.skill_id}."


def _arguments_model(handle: SkillHandle, name: str) -> type[BaseModel]:
    """A pydantic model of what the model fills in: the signature less the agent id."""
    target = inspect.unwrap(handle.fn)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # a name the annotations use is not importable: accept any JSON value
        hints = {}
    fields: dict[str, Any] = {}
    for param in handle.signature.parameters.values():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise LimenexConfigError(
                f"{handle.skill_id}: parameter {param.name!r} is {param.kind.description}; a "
                "tool takes named arguments only"
            )
        annotation = hints.get(param.name, param.annotation)
        if annotation is param.empty or isinstance(annotation, str):
            annotation = Any
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model: type[BaseModel] = create_model(
        f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model
